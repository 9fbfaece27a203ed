"""Exported runtimes, built once per session (each export takes seconds), and one torch thread per module."""

from __future__ import annotations

import pytest

for _module in ("onnx", "onnxruntime", "onnxscript"):  # the 'onnx' extra (make test installs it)
    pytest.importorskip(_module)

from fsclip.backends import load_model  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every module here runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def shapes_onnx():
    return load_model("shapes", runtime="onnx")


@pytest.fixture(scope="session")
def shapes_int8():
    return load_model("shapes", runtime="onnx-int8")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_openclip_dir):
    return load_model(str(tiny_openclip_dir), runtime="onnx")


@pytest.fixture(scope="session")
def hf_clip_onnx(tiny_hf_clip_dir):
    return load_model(f"hf:{tiny_hf_clip_dir}", runtime="onnx")


@pytest.fixture(scope="session")
def hf_siglip_onnx(tiny_hf_siglip_dir):
    return load_model(f"hf:{tiny_hf_siglip_dir}", runtime="onnx")


@pytest.fixture(scope="session")
def tiny_hf_vision_dirs(tmp_path_factory) -> dict:
    """Tiny random transformers image classifiers: a ViT (its head: one linear layer on the CLS token) and a
    DINOv2 (its head reads the CLS and mean patch tokens side by side, so it runs in torch; its processor
    resizes to 36 and crops 32, so its decode size is not its input size)."""
    import torch
    from transformers import (
        BitImageProcessorPil,
        Dinov2Config,
        Dinov2ForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessorPil,
    )

    block = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)
    labels = {0: "cat", 1: "dog", 2: "bird"}
    cases = {"vit": (ViTForImageClassification, ViTConfig, ViTImageProcessorPil(size={"height": 32, "width": 32})),
             "dinov2": (Dinov2ForImageClassification, Dinov2Config,
                        BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                             do_center_crop=True))}
    out = {}
    for name, (model_cls, config_cls, processor) in cases.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(f"tiny-{name}")
        config = config_cls(**block, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
        model_cls(config).eval().save_pretrained(folder)
        processor.save_pretrained(folder)
        out[name] = folder
    return out


@pytest.fixture(scope="session")
def shapes_resnet_int8():
    return load_model("shapes-resnet", runtime="onnx-int8")
