"""Frozen image features, encoded once per image and model and cached on disk.

Cache key: the model's weight fingerprint and input size, and a hash of the file's bytes (not its path),
so a renamed or copied image is still a hit and an edited one is not. Refitting an adapter with other
hyper-parameters, or another K-shot sample of the same folder, encodes nothing new.

Under torchrun / accelerate launch the images that any rank misses in its cache are split between the
ranks: each encodes its part, every rank gets all the features in order, and the first process on each
machine writes them to that machine's cache.
"""

from __future__ import annotations

import hashlib
import logging
import math
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
from fsclip.adapters._budget import Budget, Progress, Schedule, plan_log
from fsclip.backends import Backend
from fsclip.data import LabeledImages
from fsclip.distributed import world
from fsclip.encode import encode_images
from fsclip.errors import DataError
from fsclip.images import ImageLoadError, load_image
from fsclip.prompts_io import load_templates
from fsclip.zeroshot import build_text_classifier

__all__ = ["FeatureData", "content_key", "encode_items", "encode_views", "load_images_or_fail", "shrink_image"]

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
    """One small safetensors file per (model, image, view); `kind` keeps other feature kinds apart."""

    def __init__(self, backend: Backend, kind: str = ""):
        suffix = f"-{kind}" if kind else ""
        self.root = cache_dir("features", f"{backend.features_id}-{backend.image_size}{suffix}")

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
    """(N, D) float32 CPU features of paths or PIL images; cached per file when `cache`; split between
    the ranks under a launcher.

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
    todo = _missed_anywhere(todo)
    if todo:
        def encode(own: range) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
            idx = [todo[j] for j in own]
            # unreadable files are refused below in one line, not also logged as skipped
            feats, found, errors = encode_images(backend, [items[i] for i in idx], batch_size=batch_size,
                                                 progress=progress and world.is_main(), warn=False)
            return feats.float().cpu(), [idx[k] for k in found], [(idx[k], why) for k, why in errors]

        parts = world.map_parts(len(todo), encode)
        errors = [e for _, _, part_errors in parts for e in part_errors]
        if errors:
            raise _fail(items, errors, what)
        for feats, found, _ in parts:
            for row, i in enumerate(found):
                out[i] = feats[row]
                if store is not None and keys[i] is not None and world.is_local_main():
                    store.put(keys[i], feats[row])
    if store is not None:
        logger.info("%d %s feature(s) from cache, %d encoded", len(items) - len(todo), what, len(todo))
    return out


def _missed_anywhere(missing: list[int]) -> list[int]:
    """Positions any rank misses in its cache (one rank's cache may lack what another's holds): every
    rank then encodes its part of the same list."""
    if world.size() == 1:
        return missing
    return sorted(set().union(*world.gather(missing)))


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


def _forward_crops(backend: Backend, crops: Sequence[Image.Image], batch_size: int, pooled: bool) -> torch.Tensor:
    """(N, D) normalised features of PIL crops, or (N, W) pooled features before the final projection."""
    out = []
    backend.model.eval()
    with torch.inference_mode():
        for i in range(0, len(crops), batch_size):
            pixels = torch.stack([backend.preprocess(c) for c in crops[i : i + batch_size]])
            pixels = pixels.to(backend.device, backend.dtype)
            out.append((backend.forward_image_pooled(pixels) if pooled else backend.encode_images(pixels)).float().cpu())
    return torch.cat(out)


def encode_views(
    backend: Backend, paths: Sequence[str | os.PathLike], views: int, crop_scale: float, flip: bool, seed: int,
    progress: bool = False, batch_size: int = 32, *, budget: Budget | None = None, fixed: bool = False,
    share: float = 1.0, pooled: bool = False, what: str = "augmented views",
) -> tuple[torch.Tensor, Schedule]:
    """(V, N, D) features of V <= `views` random augmented views of each image, and how V was chosen.

    View v of an image is a function of (seed, v, the image's bytes, the augmentation), so cached views
    are exactly the ones a fresh run would draw, whichever rank draws them. Views are encoded one at a
    time (each split between the ranks under a launcher); unless `fixed`, the count is cut to what fits
    in `share` of the `budget` left, timed on the first view that needed encoding. `pooled`: features
    before the image tower's final projection (ProLIP trains it).
    """
    schedule = Schedule(what, "view", default=views, fixed=views if fixed else None)
    budget = budget or Budget(math.inf)
    store = _Store(backend, "pooled" if pooled else "")
    tag = f"aug2-s{crop_scale:g}-f{int(flip)}-seed{seed}"
    keys = [content_key(p) for p in paths]
    images: dict[int, Image.Image] = {}  # decoded once, only those this rank makes views of
    out: list[torch.Tensor] = []

    def decode(own: range) -> None:
        new = [n for n in (missing[j] for j in own) if n not in images]
        for n, img in zip(new, load_images_or_fail([paths[n] for n in new])):
            images[n] = shrink_image(img, 2 * backend.image_size)

    def encode(own: range) -> tuple[list[int], torch.Tensor | None]:
        idx = [missing[j] for j in own]
        crops = [random_view(images[n], np.random.default_rng([seed, int(keys[n][:12], 16), v]),
                             backend.image_size, crop_scale, flip) for n in idx]
        return idx, _forward_crops(backend, crops, batch_size, pooled) if crops else None

    bar = Progress(views, what, "view", progress, clock=budget.clock)
    try:
        for v in range(views):
            hits = [store.get(f"{k}-{tag}-v{v}") if k is not None else None for k in keys]
            missing = [n for n, h in enumerate(hits) if h is None or (not pooled and h.shape != (backend.embed_dim,))]
            missing = _missed_anywhere(missing)
            if missing:
                world.map_parts(len(missing), decode)  # before the clock starts: the plan times encoding only
            t0 = budget.clock()
            if missing:
                for idx, feats in world.map_parts(len(missing), encode):
                    for row, n in enumerate(idx):
                        hits[n] = feats[row]
                        if world.is_local_main():
                            store.put(f"{keys[n]}-{tag}-v{v}", feats[row])
            out.append(torch.stack(hits))
            bar.update(1)
            if schedule.planned is None and missing:
                schedule.plan(budget, budget.clock() - t0, done=v + 1, share=share)
                plan_log.info("%s", schedule.line(done=v + 1))
                bar.set_total(schedule.planned)
            if schedule.planned is not None and v + 1 >= schedule.planned:
                break
    finally:
        bar.close()
    if schedule.planned is None:  # every view was cached
        schedule.planned, schedule.seconds_per_unit, schedule.reason = len(out), 0.0, "all cached"
    logger.info("%d augmented view(s) of %d image(s) (%s)", len(out), len(paths), schedule.reason)
    return torch.stack(out) if out else torch.empty(0, len(paths), backend.embed_dim), schedule


def shrink_image(img: Image.Image, side: int) -> Image.Image:
    """Downscale so the short side is `side`: crops resized to the model's input lose nothing, and cost less."""
    if min(img.size) <= side:
        return img
    scale = side / min(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)


@dataclass
class FeatureData:
    """Everything a frozen-feature method fits on: cached training features and the zero-shot classifier.

    `val` / `val_targets` are empty when built by `build`: methods choose from the training images
    only (cross-validation), and the validation images stay for the reported accuracy. `text` is None
    for a model without a text tower (image-only backbones), whose logit scale is then 1.
    """

    train: torch.Tensor  # (N, D) normalised
    train_targets: torch.Tensor  # (N,) int64
    val: torch.Tensor  # (M, D)
    val_targets: torch.Tensor  # (M,)
    text: torch.Tensor | None  # (C, D) zero-shot class embeddings, normalised; None without a text tower
    logit_scale: float

    @property
    def num_classes(self) -> int:
        if self.text is not None:
            return self.text.shape[0]
        return int(self.train_targets.max()) + 1  # every class has training images (`check_trainable`)

    @classmethod
    def build(cls, backend: Backend, train: LabeledImages, templates, progress: bool = False,
              batch_size: int = 32) -> FeatureData:
        has_text = backend.has_text
        return cls(
            train=encode_items(backend, train.paths, progress=progress, batch_size=batch_size, what="training image"),
            train_targets=torch.tensor(train.targets, dtype=torch.long),
            val=torch.empty(0, backend.embed_dim),
            val_targets=torch.empty(0, dtype=torch.long),
            text=build_text_classifier(backend, train.classes, load_templates(templates)).float().cpu()
            if has_text else None,
            logit_scale=backend.logit_scale if has_text else 1.0,
        )
