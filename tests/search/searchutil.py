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


def model_record(backend) -> dict:
    """The `model` entry `fsclip embed` writes into its manifest for `backend`."""
    return {"spec": backend.spec, "backend": backend.name, "fingerprint": backend.fingerprint,
            "dim": backend.embed_dim, "compute_dtype": "float32", "runtime": backend.runtime}


def write_embeddings(out: Path, model: dict, paths: list[str], vecs: np.ndarray, *, metas=None,
                     failed: list[tuple[str, str]] = (), shard_size: int = 10_000) -> Path:
    """An `fsclip embed` output folder holding these rows, written as `fsclip embed` writes it (shards +
    manifest), for loading synthetic vectors with `--from-embeddings`. `metas` default: a hash derived
    from the vector, size 1000 + i, mtime 1.6e18 + i, 32x32 pixels."""
    import hashlib
    import json

    from fsclip.embed import FORMAT, FORMAT_VERSION, ImageMeta, ShardResult, shard_bytes

    if metas is None:
        metas = [ImageMeta(hashlib.blake2b(v.tobytes(), digest_size=16).hexdigest(), 1000 + i,
                           1_600_000_000_000_000_000 + i, 32, 32) for i, v in enumerate(vecs)]
    (out / "shards").mkdir(parents=True)
    shards = []
    for n, lo in enumerate(range(0, len(paths), shard_size)):
        hi = lo + shard_size
        data = shard_bytes(ShardResult(n, list(paths[lo:hi]), list(metas[lo:hi]), vecs[lo:hi], []), vecs.shape[1])
        name = f"shards/part-{n:05d}.parquet"
        (out / name).write_bytes(data)
        shards.append({"shard": n, "file": name, "rows": len(paths[lo:hi]), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "status": "complete", "model": model,
                "dtype": "float32", "shard_size": shard_size, "inputs": {"count": len(paths), "sha256": "-"},
                "rows": len(paths), "shards": shards, "failed": [{"path": p, "reason": r} for p, r in failed]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out
