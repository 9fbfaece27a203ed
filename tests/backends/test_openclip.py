import open_clip
import pytest
import torch

from fsclip.backends import load_model
from fsclip.zeroshot import ZeroShotClassifier

LABELS = ["cat", "dog", "a very long class name with many words in it", "bird"]
TEMPLATES = ["a photo of a {}.", "itap of the {}.", "a blurry photo of my {}, which I took yesterday."]


@pytest.fixture(scope="module")
def pair(tiny_openclip_dir):
    ours = load_model(str(tiny_openclip_dir), device="cpu")
    ref, _, ref_pre = open_clip.create_model_and_transforms(f"local-dir:{tiny_openclip_dir}")
    return ours, ref.eval(), ref_pre, open_clip.get_tokenizer(f"local-dir:{tiny_openclip_dir}")


def test_folder_spec_is_detected_as_open_clip(pair):
    ours, *_ = pair
    assert ours.name == "open_clip"
    assert ours.exact_short_text
    assert ours.embed_dim == 16 and ours.image_size == 32


def test_zero_shot_matches_open_clip_recipe(pair, rgb_images):
    ours, ref, ref_pre, tok = pair
    clf = ZeroShotClassifier(ours, LABELS, TEMPLATES, use_cache=False)
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(ref, tok, LABELS, TEMPLATES, device="cpu")  # (D, C)
        feats = ref.encode_image(torch.stack([ref_pre(im) for im in rgb_images]), normalize=True)
        ref_logits = ref.logit_scale.exp() * feats @ weights
    our_feats = ours.encode_images(torch.stack([ours.preprocess(im) for im in rgb_images]))
    logits = clf.logits(our_feats)
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(logits.argmax(1), ref_logits.argmax(1))


def test_short_text_encoding_equals_encode_text(pair):
    ours, ref, _, tok = pair
    texts = [t.format(c) for c in LABELS for t in TEMPLATES] + ["", "x " * 100]  # empty and over-long
    fast = ours.encode_texts(texts, batch_size=5)
    with torch.no_grad():
        slow = ref.encode_text(tok(texts), normalize=True)
    assert (fast - slow).abs().max() <= 1e-5
    # and the fast path really is shorter than the context
    assert ours.tokenize(["a cat"])["input_ids"].shape[1] == 4


def test_non_causal_text_tower_uses_the_plain_path(tiny_openclip_dir, tmp_path):
    import json
    import shutil

    from fsclip.backends.openclip import OpenClipBackend

    cfg = json.loads((tiny_openclip_dir / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"].update(pool_type="last", no_causal_mask=True)
    shutil.copy(tiny_openclip_dir / "open_clip_model.safetensors", tmp_path)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    assert not OpenClipBackend(
        "x", model.eval(), torch.device("cpu"), torch.float32, None, open_clip.get_tokenizer(f"local-dir:{tmp_path}")
    ).exact_short_text
