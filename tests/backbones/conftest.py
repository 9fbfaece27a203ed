"""Image-only backbones (no text tower): tiny random timm CNN and ViT, a small shapes task, one torch thread."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from fsclip.data import LabeledImages, load_image_folder
from fsclip.shapes import BASE_SHAPES, COLOURS, NOVEL_SHAPES, write_folder


class Task(NamedTuple):
    train: LabeledImages
    val: LabeledImages
    test: LabeledImages

    @property
    def root(self) -> Path:
        """The folder holding train/ val/ test/."""
        return self.train.paths[0].parents[2]


TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 4}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every module here runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """A randomly initialised timm ViT (4 unnamed classes) in timm's hub layout."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
    out = tmp_path_factory.mktemp("tiny-vit")
    save_for_hf(model.eval(), out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_cnn(tiny_timm_dir):
    from fsclip.backends import load_model

    return load_model(str(tiny_timm_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_vit(tiny_vit_dir):
    from fsclip.backends import load_model

    return load_model(str(tiny_vit_dir), device="cpu")


def _write_task(root: Path, shapes, train: int, val: int, test: int, size: int, seed: int = 0) -> Task:
    """train/ val/ test/ ImageFolders of `shapes` in random colours (render seeds seed, seed+1, seed+2)."""
    classes = {s: [(c, s) for c in COLOURS] for s in shapes}
    for name, n, offset in (("train", train, 0), ("val", val, 1), ("test", test, 2)):
        write_folder(root / name, classes, n, seed=seed + offset, size=size)
    pool = load_image_folder(root / "train")
    names = list(pool.classes)
    return Task(pool, load_image_folder(root / "val", names), load_image_folder(root / "test", names))


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> Task:
    """3 shapes: 3 training, 2 validation and 3 test images each, 48 px (contract tests on tiny models)."""
    return _write_task(tmp_path_factory.mktemp("image-only-task"), ("circle", "square", "star"), 3, 2, 3, 48)


@pytest.fixture(scope="session")
def novel_task(tmp_path_factory) -> Task:
    """The 9 shapes of eval/fewshot_table.py (6 base + 3 that shapes-resnet never saw): 4 training, 2 validation
    and 10 test images each, 64 px (shapes-resnet's input size), render seeds 0, 1, 2."""
    return _write_task(tmp_path_factory.mktemp("novel-task"), BASE_SHAPES + NOVEL_SHAPES, 4, 2, 10, 64)
