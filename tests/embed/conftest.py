"""Embed fixtures: a photo folder from the shapes world with one corrupt and one empty file, and the
output of one uninterrupted local run over it (the reference every other run must equal)."""

from __future__ import annotations

from pathlib import Path

import pytest
from embedutil import BAD, embed_argv, render_photos


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every module here runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """40 files: 38 shapes-world PNGs in two folders, a corrupt PNG and an empty JPEG."""
    root = tmp_path_factory.mktemp("embed-photos")
    render_photos(root / "a", 20, seed=1)
    render_photos(root / "b", 18, seed=2, start=20)
    for name, data in BAD.items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="session")
def reference(tmp_path_factory, photos) -> Path:
    """One uninterrupted local run over `photos`."""
    from fsclip.cli import main

    out = tmp_path_factory.mktemp("embed-reference") / "ref"
    assert main(embed_argv([photos], out)) == 0
    return out
