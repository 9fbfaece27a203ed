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
        "tip-adapter-f": {"epochs": 2, "views": 2},
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
