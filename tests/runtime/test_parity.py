"""ONNX Runtime fp32 against torch: same normalised features, for both towers, at every text length.

Measured on these tiny random models: max abs differences of 1e-7 to 3e-7 (fp32 rounding from a
different op order); 1e-5 leaves a wide margin and is still 10x inside the export gate's 1e-4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsclip.runtime.ort_backend import OrtBackend

TOL = 1e-5
TEXTS = ["", "dog", "a photo of a cat.", "a blurry photo of a very large and extremely fluffy dog, outdoors.",
         "x " * 200]  # empty, short, long, and over the context length (truncated)


def _pixels(backend, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, backend.image_size, backend.image_size, generator=g)


@pytest.mark.parametrize("name", ["tiny_onnx", "hf_clip_onnx", "hf_siglip_onnx"])
def test_image_tower_matches_torch_at_any_batch_size(name, request):
    ort = request.getfixturevalue(name)
    assert isinstance(ort, OrtBackend) and ort.runtime == "onnx" and ort.gate["passed"]
    for n in (1, 5, 33):  # the export saw a batch of 2
        pixels = _pixels(ort, n, seed=n)
        diff = (ort.encode_images(pixels, batch_size=16) - ort.base.encode_images(pixels, batch_size=16)).abs()
        assert diff.max() <= TOL


@pytest.mark.parametrize("name", ["tiny_onnx", "hf_clip_onnx", "hf_siglip_onnx"])
def test_text_tower_matches_torch_on_trimmed_batches(name, request):
    ort = request.getfixturevalue(name)
    texts = TEXTS + [f"a photo of {'a very ' * k}big dog." for k in range(12)]
    diff = (ort.encode_texts(texts, batch_size=3) - ort.base.encode_texts(texts, batch_size=3)).abs()
    assert diff.max() <= TOL


def test_causal_towers_run_trimmed_and_full_length(tiny_onnx, hf_clip_onnx):
    assert tiny_onnx.exact_short_text and hf_clip_onnx.exact_short_text
    # trimmed: open_clip cuts each batch to its longest text, here 3 tokens
    short = tiny_onnx.tokenize(["dog"])
    assert short["input_ids"].shape[1] == 3
    # untrimmed: the full 77-token context, as open_clip's own encode_text takes it
    import open_clip

    full = open_clip.get_tokenizer(tiny_onnx.spec.join(["local-dir:", ""]))(TEXTS)
    with torch.inference_mode():
        ours = tiny_onnx.forward_texts({"input_ids": full})
        ref = F.normalize(tiny_onnx.model.encode_text(full), dim=-1)
        assert (ours - ref).abs().max() <= TOL
        assert (tiny_onnx.forward_texts(short) - tiny_onnx.base.forward_texts(short)).abs().max() <= TOL
    # transformers CLIP, padded to max length with an attention mask
    tok = hf_clip_onnx.base._tokenizer
    enc = tok(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.inference_mode():
        assert (hf_clip_onnx.forward_texts(inputs) - hf_clip_onnx.base.forward_texts(inputs)).abs().max() <= TOL


def test_same_backend_surface_as_torch(tiny_onnx):
    base = tiny_onnx.base
    assert tiny_onnx.fingerprint == base.fingerprint and tiny_onnx.name == base.name == "open_clip"
    assert tiny_onnx.embed_dim == base.embed_dim and tiny_onnx.logit_scale == base.logit_scale
    assert tiny_onnx.transform is base.transform  # backend-specific extras pass through
    assert tiny_onnx.features_id == f"{base.features_id}-onnx"


def test_towers_refuse_to_train(tiny_onnx):
    from fsclip.errors import UsageError

    with pytest.raises(UsageError, match="inference only.*--runtime torch"):
        tiny_onnx.forward_images(_pixels(tiny_onnx, 2))
