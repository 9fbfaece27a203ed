"""Image features of a whole evaluation split, encoded once per (model, dataset, split) and cached.

The key covers the model's weight fingerprint and input size, and the split's file list with each
file's size and modification time: another model, an added, removed or edited image all miss.
Unreadable images are left out of the evaluation (and counted), as a real run over photos must.
Under torchrun / accelerate launch the ranks encode a split together, each its part.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from fsclip._cache import cache_dir
from fsclip._io import atomic_write
from fsclip.backends import Backend
from fsclip.distributed import world
from fsclip.encode import encode_images

__all__ = ["SplitFeatures", "split_features"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitFeatures:
    features: torch.Tensor  # (M, D) normalised float32, CPU; M <= N images that decoded
    indices: torch.Tensor  # (M,) int64 positions of those images in the split
    errors: tuple[tuple[str, str], ...]  # (path, reason) of the images left out
    cached: bool  # True when nothing was encoded


def _key(backend: Backend, paths: Sequence[Path]) -> str:
    h = hashlib.sha256(f"{backend.features_id}:{backend.image_size}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(os.fsencode(p) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # os.fsencode: names that are not valid UTF-8 hash as their bytes
            h.update(os.fsencode(p) + b"\0missing\n")
    return h.hexdigest()[:32]


def _read(file: Path, tag: str) -> SplitFeatures | None:
    try:
        with safe_open(file, "pt") as f:
            errors = json.loads((f.metadata() or {}).get("errors", "[]"))
            feats, indices = f.get_tensor("features"), f.get_tensor("indices")
    except Exception:  # a torn or foreign file is a miss, never an error
        logger.warning("%s: unreadable feature cache %s; encoding again", tag, file)
        return None
    logger.info("%s: features from cache %s", tag, file)
    return SplitFeatures(feats, indices, tuple(map(tuple, errors)), True)


def split_features(backend: Backend, paths: Sequence[Path], tag: str, batch_size: int = 32,
                   progress: bool = False, use_cache: bool = True) -> SplitFeatures:
    """Features of every image in `paths` (one split); `tag` names the cache file (e.g. `dtd-test`).

    Under a launcher every rank must call it: the ranks read the cache if all of them have it, or
    encode a part each and all get every feature (the first process of each machine writes the cache).
    """
    safe_tag = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in tag)
    file = cache_dir("eval-features") / f"{safe_tag}-{_key(backend, paths)}.safetensors"
    hit = _read(file, tag) if use_cache and file.exists() else None
    if world.size() > 1 and not all(world.gather(hit is not None)):
        hit = None  # some machine lacks the cache: encode together
    if hit is not None:
        return hit

    def encode(own: range) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
        idx = list(own)
        feats, ok, errs = encode_images(backend, [paths[i] for i in idx], batch_size=batch_size,
                                        progress=progress and world.is_main(), warn=False)  # reported below
        return feats.float().cpu(), [idx[k] for k in ok], [(idx[k], why) for k, why in errs]

    parts = world.map_parts(len(paths), encode)
    errors = tuple((str(paths[i]), why) for _, _, errs in parts for i, why in errs)
    for path, why in errors[:5]:
        logger.warning("%s: left out %s (%s)", tag, path, why)
    if len(errors) > 5:
        logger.warning("%s: left out %d more unreadable image(s) (counted in skipped_images)", tag, len(errors) - 5)
    ok = [i for _, found, _ in parts for i in found]
    out = SplitFeatures(torch.cat([feats for feats, _, _ in parts]), torch.tensor(ok, dtype=torch.long), errors, False)
    if use_cache and world.is_local_main():
        with atomic_write(file) as f:
            f.write(save({"features": out.features.contiguous(), "indices": out.indices},
                         metadata={"errors": json.dumps(list(errors))}))
    return out
