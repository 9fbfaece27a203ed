"""transformers image-only backbones: parity with the pooled output on identical random weights, own head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsclip.backends import load_model
from fsclip.errors import UsageError

transformers = pytest.importorskip("transformers")
BLOCK = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)


def _dinov2():
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    return (Dinov2Model(Dinov2Config(**BLOCK)),
            BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_center_crop=True))


def _vit():
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    labels = {0: "cat", 1: "dog", 2: "bird"}
    cfg = ViTConfig(**BLOCK, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    return ViTForImageClassification(cfg), ViTImageProcessorPil(size={"height": 32, "width": 32})


def _resnet():
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetModel

    return (ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])),
            ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=0.875))


# what each model type's own classifier reads (see hf_vision._CLS_TOKEN_TYPES)
CASES = {"dinov2": (_dinov2, "pooler"), "vit": (_vit, "cls"), "resnet": (_resnet, "pooler")}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread for the module (see tests/conftest.py)."""


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny_vision(request, tmp_path_factory):
    torch.manual_seed(0)
    model, processor = CASES[request.param][0]()
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return request.param, folder, processor


def test_features_equal_the_pooled_output(tiny_vision, rgb_images):
    from transformers import AutoModel

    kind, folder, processor = tiny_vision
    ours = load_model(str(folder), device="cpu")
    assert ours.name == "transformers-vision" and not ours.has_text
    pixels = torch.stack([ours.preprocess(im) for im in rgb_images])
    # preprocessing is the checkpoint's own (PIL-backend) image processor, exactly
    assert torch.equal(pixels, processor(images=rgb_images, return_tensors="pt")["pixel_values"])
    ref = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = ref(pixel_values=pixels)
    pooled = out.last_hidden_state[:, 0] if CASES[kind][1] == "cls" else out.pooler_output.flatten(1)
    assert ours.embed_dim == pooled.shape[1]
    assert (ours.encode_images(pixels) - F.normalize(pooled, dim=-1)).abs().max() <= 1e-5
    assert len(ours.image_blocks()) == 2
    with pytest.raises(UsageError, match="has no text tower"):
        ours.encode_texts(["a photo of a cat"])


def test_own_head_is_the_checkpoints_classifier(tiny_vision, rgb_images):
    from transformers import AutoModelForImageClassification

    kind, folder, _ = tiny_vision
    ours = load_model(str(folder), device="cpu")
    if kind != "vit":  # saved without a classification head
        assert not ours.has_own_head
        with pytest.raises(UsageError, match="no classification head of its own"):
            ours.own_head_labels()
        return
    assert ours.has_own_head and ours.own_head_labels() == ["cat", "dog", "bird"]
    pixels = torch.stack([ours.preprocess(im) for im in rgb_images])
    with torch.no_grad():
        logits = AutoModelForImageClassification.from_pretrained(folder).eval()(pixel_values=pixels).logits
    assert (ours.encode_own_head(pixels) - logits).abs().max() <= 1e-5


def test_sizes_come_from_the_processor(tiny_vision):
    kind, folder, _ = tiny_vision
    ours = load_model(f"hf:{folder}", device="cpu")
    # the input side, and the resize before the centre crop (JPEG draft decoding must not go below it)
    assert (ours.image_size, ours.decode_size) == {"dinov2": (32, 36), "vit": (32, 32), "resnet": (32, 36)}[kind]
