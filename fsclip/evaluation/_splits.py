"""Deterministic train/val/test splits of one-folder-per-class image collections."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fsclip.data import LabeledImages
from fsclip.errors import DataError
from fsclip.images import IMAGE_EXTENSIONS

__all__ = ["SPLITS", "split_folders", "split_per_class"]

SPLITS = ("train", "val", "test")


def split_per_class(data: LabeledImages, seed: int = 0) -> tuple[LabeledImages, LabeledImages, LabeledImages]:
    """50/20/30 per class with a fixed seed, as CoOp makes its split files; each part gets >= 1 per class."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c, idx in data.by_class().items():
        if len(idx) < 3:
            raise DataError(f"class {data.classes[c]!r} has {len(idx)} image(s); a train/val/test split needs 3")
        idx = [idx[i] for i in rng.permutation(len(idx))]
        n_val = max(1, round(0.2 * len(idx)))
        n_train = min(max(1, round(0.5 * len(idx))), len(idx) - n_val - 1)
        parts["train"].extend(idx[:n_train])
        parts["val"].extend(idx[n_train:n_train + n_val])
        parts["test"].extend(idx[n_train + n_val:])
    train, val, test = (data.subset(sorted(parts[s])) for s in SPLITS)
    return train, val, test


def split_folders(
    image_dir: Path, ignored: tuple[str, ...] = (), renames: Mapping[str, str] | None = None, seed: int = 0,
) -> tuple[LabeledImages, LabeledImages, LabeledImages]:
    """One folder per class (folder name -> class name after `renames`, `_` read as a space), split 50/20/30."""
    renames = renames or {}
    folders = sorted(p for p in image_dir.iterdir()
                     if p.is_dir() and not p.name.startswith(".") and p.name not in ignored)
    if not folders:
        raise DataError(f"{image_dir} has no class folders (expected one sub-folder per class)")
    paths, targets = [], []
    for label, folder in enumerate(folders):
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        paths.extend(files)
        targets.extend([label] * len(files))
    classes = tuple(renames.get(f.name, f.name).replace("_", " ") for f in folders)
    return split_per_class(LabeledImages(tuple(paths), tuple(targets), classes), seed)
