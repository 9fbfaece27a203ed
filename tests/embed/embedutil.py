"""Helpers for the embed tests: shapes-world photo folders, the CLI argv, and reading an output back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from fsclip.shapes.world import BASE_SHAPES, COLOURS, render

COMBOS = [(c, s) for c in COLOURS for s in BASE_SHAPES]
BAD = {"b/corrupt.png": b"\x89PNG\r\n\x1a\n this is not the rest of a PNG", "b/empty.jpg": b""}


def render_photos(folder: Path, n: int, seed: int, start: int = 0, size: int = 48) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        colour, shape = COMBOS[rng.integers(len(COMBOS))]
        render(colour, shape, rng, size).save(folder / f"img{i:04d}.png")


def embed_argv(sources, out, *extra) -> list[str]:
    return ["embed", *map(str, sources), "--out", str(out), "--model", "shapes", "--device", "cpu",
            "--shard-size", "8", "--batch-size", "8", "--format", "json", "-q", *extra]


def read_rows(out: Path) -> tuple[list[str], np.ndarray, dict]:
    """(paths, embeddings as float32 (N, D), metadata columns) of every shard of `out`."""
    table = pq.read_table(out / "shards")
    emb = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
    meta = {c: table.column(c).to_pylist() for c in ("hash", "size", "mtime_ns", "width", "height")}
    return table.column("path").to_pylist(), emb.reshape(table.num_rows, -1), meta
