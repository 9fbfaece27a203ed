"""Embed fixtures: a photo folder from the shapes world with one corrupt and one empty file, and the
output of one uninterrupted local run over it (the reference every other run must equal)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fsclip.shapes.world import BASE_SHAPES, COLOURS, render

COMBOS = [(c, s) for c in COLOURS for s in BASE_SHAPES]
BAD = {"b/corrupt.png": b"\x89PNG\r\n\x1a\n this is not the rest of a PNG", "b/empty.jpg": b""}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every module here runs with one torch thread (see tests/conftest.py)."""


def render_photos(folder: Path, n: int, seed: int, start: int = 0, size: int = 48) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        colour, shape = COMBOS[rng.integers(len(COMBOS))]
        render(colour, shape, rng, size).save(folder / f"img{i:04d}.png")


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """40 files: 38 shapes-world PNGs in two folders, a corrupt PNG and an empty JPEG."""
    root = tmp_path_factory.mktemp("embed-photos")
    render_photos(root / "a", 20, seed=1)
    render_photos(root / "b", 18, seed=2, start=20)
    for name, data in BAD.items():
        (root / name).write_bytes(data)
    return root


def embed_argv(sources, out, *extra) -> list[str]:
    return ["embed", *map(str, sources), "--out", str(out), "--model", "shapes", "--device", "cpu",
            "--shard-size", "8", "--batch-size", "8", "--format", "json", "-q", *extra]


def read_rows(out: Path) -> tuple[list[str], np.ndarray, dict]:
    """(paths, embeddings as float32 (N, D), metadata columns) of every shard of `out`."""
    table = pq.read_table(out / "shards")
    emb = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
    meta = {c: table.column(c).to_pylist() for c in ("hash", "size", "mtime_ns", "width", "height")}
    return table.column("path").to_pylist(), emb.reshape(table.num_rows, -1), meta


@pytest.fixture(scope="session")
def reference(tmp_path_factory, photos) -> Path:
    """One uninterrupted local run over `photos`."""
    from fsclip.cli import main

    out = tmp_path_factory.mktemp("embed-reference") / "ref"
    assert main(embed_argv([photos], out)) == 0
    return out
