"""Helpers for the search tests: photo folders rendered from the shapes world, synthetic embeddings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from eval.bench_search import synthetic_embeddings as _mixture
from fsclip.shapes.world import BASE_SHAPES, COLOURS, render

COMBOS = [(c, s) for c in COLOURS for s in BASE_SHAPES]
SHAPES_WEIGHTS = Path(__file__).resolve().parents[2] / "fsclip" / "assets" / "shapes-clip" / "open_clip_model.safetensors"
needs_shapes = pytest.mark.skipif(not SHAPES_WEIGHTS.is_file(),
                                  reason="shapes-world weights not trained yet (fsclip/assets/shapes-clip)")


def render_photos(folder: Path, n: int, seed: int = 0, size: int = 32, start: int = 0,
                  combos=COMBOS) -> list[Path]:
    """`n` PNGs `folder/img<i>.png`, each one random coloured shape; returns their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        colour, shape = combos[rng.integers(len(combos))]
        path = folder / f"img{i:04d}.png"
        render(colour, shape, rng, size).save(path)
        out.append(path)
    return out


def set_mtime(path: Path, seconds: float) -> None:
    os.utime(path, (seconds, seconds))


def synthetic_embeddings(n: int, dim: int, seed: int, clusters: int, rank: int = 16) -> np.ndarray:
    """The benchmark's embedding-like mixture (eval/bench_search.py), drawn in one chunk."""
    return _mixture(n, dim, seed, clusters, rank, chunk=max(n, 1))
