"""Small shapes-world evaluation sets, written once per session, and one CPU thread for these tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsclip.evaluation.shapes import write_captions, write_compositional, write_novel


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every module here runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """The three shapes-world datasets at test size, under one data root, as `--root` takes it."""
    root = tmp_path_factory.mktemp("eval-data")
    write_compositional(root / "shapes-compositional", per_class=3, seed=0)
    write_novel(root / "shapes-novel", train=16, val=4, test=10, seed=0)
    write_captions(root / "shapes-captions", seed=0)
    return root


@pytest.fixture
def png():
    """`png(path, seed)` writes a small random RGB image (creating folders) and returns its path."""

    def write(path: Path, seed: int = 0) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        return path

    return write
