"""Helpers for the search tests: photo folders rendered from the shapes world, synthetic embeddings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

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
    """Unit vectors shaped like image embeddings (the mixture eval/bench_search.py uses).

    A mixture of `clusters` components (the benchmark uses one per 100 vectors) around random unit
    centres, each spread along its own `rank`-dimensional subspace (offset norm 0.5-1.5) plus
    isotropic noise of norm 0.2: low intrinsic dimension, like real CLIP features. The mixture is
    fixed (seed 12345); `seed` draws the points, so queries drawn with another seed come from the
    same distribution.
    """
    fixed = np.random.default_rng(12345)
    centres = fixed.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = fixed.standard_normal((clusters, rank, dim), dtype=np.float32) / np.sqrt(rank * dim)
    spread = fixed.uniform(0.5, 1.5, clusters).astype(np.float32)
    rng = np.random.default_rng(seed)
    comp = rng.integers(clusters, size=n)
    z = rng.standard_normal((n, rank), dtype=np.float32) * spread[comp, None]
    x = centres[comp] + 0.2 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    x += np.einsum("nr,nrd->nd", z, bases[comp])  # (n, rank) x (n, rank, dim) -> (n, dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
