"""Frozen image features, encoded once per image and model and cached on disk.

Cache key: the model's weight fingerprint and input size, and a hash of the file's bytes (not its path),
so a renamed or copied image is still a hit and an edited one is not. Refitting an adapter with other
hyper-parameters, or another K-shot sample of the same folder, encodes nothing new.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save

from fsclip._cache import cache_dir
from fsclip._io import atomic_write
from fsclip.adapters._augment import random_view
from fsclip.backends import Backend
from fsclip.data import LabeledImages
from fsclip.encode import encode_images
from fsclip.errors import DataError
from fsclip.images import ImageLoadError, load_image
from fsclip.prompts_io import load_templates
from fsclip.zeroshot import build_text_classifier

__all__ = ["FeatureData", "content_key", "encode_items", "encode_views", "load_images_or_fail"]

logger = logging.getLogger(__name__)

Item = str | os.PathLike | Image.Image


def content_key(path: str | os.PathLike) -> str | None:
    """sha256 of the file's bytes (first 32 hex digits), or None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()[:32]
    except OSError:
        return None


class _Store:
    """One small safetensors file per (model, image, view)."""

    def __init__(self, backend: Backend):
        self.root = cache_dir("features", f"{backend.features_id}-{backend.image_size}")

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            return load_file(path)["f"]
        except Exception:  # a torn or foreign file is a miss, never an error
            return None

    def put(self, key: str, feature: torch.Tensor) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        with atomic_write(path) as f:
            f.write(save({"f": feature.detach().to("cpu", torch.float32).contiguous()}))


def _fail(items: Sequence[Item], errors: list[tuple[int, str]], what: str) -> DataError:
    shown = "; ".join(f"{items[i]} ({why})" for i, why in errors[:3])
    more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
    return DataError(f"cannot read {len(errors)} {what}(s): {shown}{more}")


def encode_items(
    backend: Backend, items: Sequence[Item], cache: bool = True, progress: bool = False, batch_size: int = 32,
    what: str = "image",
) -> torch.Tensor:
    """(N, D) float32 CPU features of paths or PIL images; cached per file when `cache`.

    Raises:
        DataError: naming the files that could not be read (all of them are tried first).
    """
    items = list(items)
    out = torch.empty(len(items), backend.embed_dim)
    store = _Store(backend) if cache else None
    keys: list[str | None] = [None] * len(items)
    todo = []
    for i, item in enumerate(items):
        if store is not None and not isinstance(item, Image.Image):
            keys[i] = content_key(item)
            hit = store.get(keys[i]) if keys[i] is not None else None
            if hit is not None and hit.shape == (backend.embed_dim,):
                out[i] = hit
                continue
        todo.append(i)
    if todo:
        feats, found, errors = encode_images(backend, [items[i] for i in todo], batch_size=batch_size, progress=progress)
        if errors:
            raise _fail([items[i] for i in todo], errors, what)
        feats = feats.float().cpu()
        for row, j in enumerate(found):
            i = todo[j]
            out[i] = feats[row]
            if store is not None and keys[i] is not None:
                store.put(keys[i], feats[row])
    if store is not None:
        logger.info("%d %s feature(s) from cache, %d encoded", len(items) - len(todo), what, len(todo))
    return out


def load_images_or_fail(paths: Sequence[str | os.PathLike], what: str = "training image") -> list[Image.Image]:
    """Decode every image (RGB, EXIF-rotated) or raise one `DataError` naming the unreadable ones."""
    images, errors = [], []
    for i, p in enumerate(paths):
        try:
            images.append(load_image(p))
        except ImageLoadError as e:
            errors.append((i, str(e)))
    if errors:
        raise _fail(list(paths), errors, what)
    return images


def encode_views(
    backend: Backend, paths: Sequence[str | os.PathLike], views: int, crop_scale: float, flip: bool, seed: int,
    progress: bool = False, batch_size: int = 32,
) -> torch.Tensor:
    """(views, N, D) features of random augmented views of each image, cached like plain features.

    View v of an image is a function of (seed, v, the image's bytes, the augmentation), so cached views
    are exactly the ones a fresh run would draw.
    """
    out = torch.empty(views, len(paths), backend.embed_dim)
    if views == 0:
        return out
    store = _Store(backend)
    tag = f"aug-s{crop_scale:g}-f{int(flip)}-seed{seed}"
    keys = [content_key(p) for p in paths]
    missing = []
    for n, key in enumerate(keys):
        for v in range(views):
            hit = store.get(f"{key}-{tag}-v{v}") if key is not None else None
            if hit is None or hit.shape != (backend.embed_dim,):
                missing.append(n)
                break
            out[v, n] = hit
    if missing:
        images = load_images_or_fail([paths[n] for n in missing])
        crops = []
        for n, img in zip(missing, images):
            rng = np.random.default_rng([seed, int(keys[n][:12], 16)])
            crops.extend(random_view(img, rng, backend.image_size, crop_scale, flip) for _ in range(views))
        feats, _, errors = encode_images(backend, crops, batch_size=batch_size, progress=progress)
        feats = feats.float().cpu().view(len(missing), views, -1)
        for row, n in enumerate(missing):
            for v in range(views):
                out[v, n] = feats[row, v]
                store.put(f"{keys[n]}-{tag}-v{v}", feats[row, v])
    logger.info("%d of %d image(s) had their %d augmented views cached", len(paths) - len(missing), len(paths), views)
    return out


@dataclass
class FeatureData:
    """Everything a frozen-feature method fits on: cached features, targets and the zero-shot classifier."""

    train: torch.Tensor  # (N, D) normalised
    train_targets: torch.Tensor  # (N,) int64
    val: torch.Tensor  # (M, D)
    val_targets: torch.Tensor  # (M,)
    text: torch.Tensor  # (C, D) zero-shot class embeddings, normalised
    logit_scale: float

    @property
    def num_classes(self) -> int:
        return self.text.shape[0]

    @classmethod
    def build(
        cls, backend: Backend, train: LabeledImages, val: LabeledImages, templates, progress: bool = False,
        batch_size: int = 32,
    ) -> FeatureData:
        return cls(
            train=encode_items(backend, train.paths, progress=progress, batch_size=batch_size, what="training image"),
            train_targets=torch.tensor(train.targets, dtype=torch.long),
            val=encode_items(backend, val.paths, progress=progress, batch_size=batch_size, what="validation image"),
            val_targets=torch.tensor(val.targets, dtype=torch.long),
            text=build_text_classifier(backend, train.classes, load_templates(templates)).float().cpu(),
            logit_scale=backend.logit_scale,
        )
