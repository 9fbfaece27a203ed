"""Few-shot data: shape images in random colours, written once per session as ImageFolders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fsclip.data import LabeledImages, load_image_folder
from fsclip.shapes import BASE_SHAPES, COLOURS, NOVEL_SHAPES, write_folder

SHAPES = BASE_SHAPES + NOVEL_SHAPES



@dataclass
class Task:
    root: Path
    pool: LabeledImages  # training pool: sample K shots per class from it
    val: LabeledImages
    test: LabeledImages

    @property
    def test_targets(self) -> torch.Tensor:
        return torch.tensor(self.test.targets)


def _write(root: Path, shapes, train: int, val: int, test: int, size: int = 96) -> Task:
    classes = {s: [(c, s) for c in COLOURS] for s in shapes}
    write_folder(root / "train", classes, train, seed=0, size=size)
    write_folder(root / "val", classes, val, seed=1, size=size)
    write_folder(root / "test", classes, test, seed=2, size=size)
    pool = load_image_folder(root / "train")
    names = list(pool.classes)
    return Task(root, pool, load_image_folder(root / "val", names), load_image_folder(root / "test", names))


@pytest.fixture(scope="session")
def shapes_task(tmp_path_factory) -> Task:
    """Base + novel shapes (9 classes): 16 training, 8 validation and 30 test images per class."""
    return _write(tmp_path_factory.mktemp("shapes-task"), SHAPES, 16, 8, 30)


@pytest.fixture(scope="session")
def small_task(tmp_path_factory) -> Task:
    """3 classes, 6 training / 3 validation / 4 test images each: for contract tests on tiny models."""
    return _write(tmp_path_factory.mktemp("small-task"), ("circle", "square", "ring"), 6, 3, 4, size=48)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every module here runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def fast_options() -> dict[str, dict]:
    """Small budgets per method, for contract tests on tiny random models (accuracy is not the point)."""
    return {
        "tip-adapter": {"views": 2},
        "tip-adapter-f": {"epochs": 2, "views": 2},
        "clap": {"epochs": 2, "views": 2},
        "prolip": {"epochs": 3, "views": 2},
        "coop": {"epochs": 2, "views": 2, "n_ctx": 4},
        "lora": {"iters": 4},
        "partial-ft": {"iters": 4, "blocks": 1},
        "full-ft": {"iters": 4},
    }


@pytest.fixture(scope="session")
def tiny_openclip(tiny_openclip_dir):
    from fsclip.backends import load_model

    return load_model(str(tiny_openclip_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_hf_clip(tiny_hf_clip_dir):
    from fsclip.backends import load_model

    return load_model(f"hf:{tiny_hf_clip_dir}", device="cpu")


TINY_RESNET = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory):
    """An open_clip CLIP with a ModifiedResNet image tower (RN50's kind: attention pooling, no blocks of attention)."""
    import json

    import open_clip
    from safetensors.torch import save_file

    from fsclip.backends import load_model

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_RESNET)
    out = tmp_path_factory.mktemp("tiny-resnet")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")
    preprocess = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_RESNET, "preprocess_cfg": preprocess}))
    return load_model(str(out), device="cpu")
