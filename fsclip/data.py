"""Labelled image sets: ImageFolder loading, K-shot sampling and stratified splits."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fsclip.errors import DataError
from fsclip.images import IMAGE_EXTENSIONS

__all__ = ["LabeledImages", "load_image_folder", "sample_shots", "split_per_class"]


@dataclass(frozen=True)
class LabeledImages:
    """Image paths with integer targets into `classes` (class names, `_` already read as a space)."""

    paths: tuple[Path, ...]
    targets: tuple[int, ...]
    classes: tuple[str, ...]

    def __post_init__(self):
        if len(self.paths) != len(self.targets):
            raise ValueError(f"paths ({len(self.paths)}) and targets ({len(self.targets)}) differ in length")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices) -> LabeledImages:
        return LabeledImages(tuple(self.paths[i] for i in indices), tuple(self.targets[i] for i in indices), self.classes)

    def by_class(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {c: [] for c in range(len(self.classes))}
        for i, t in enumerate(self.targets):
            out[t].append(i)
        return out

    def counts(self) -> dict[str, int]:
        return {self.classes[c]: len(ix) for c, ix in self.by_class().items()}


def load_image_folder(root: str | os.PathLike, classes: list[str] | None = None) -> LabeledImages:
    """`root/<class>/**/<image>`; folder names become class names with `_` read as a space.

    `classes` fixes the class order (e.g. a validation folder must match training); a class with no
    images is an error, not a silently smaller problem.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is not a folder (expected one sub-folder per class)")
    folders = {p.name.replace("_", " "): p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    if not folders:
        raise DataError(f"{str(root)!r} has no class sub-folders (expected root/<class>/<image>)")
    if classes is not None:
        missing, extra = sorted(set(classes) - set(folders)), sorted(set(folders) - set(classes))
        if missing or extra:
            raise DataError(f"classes in {str(root)!r} differ from training: missing {missing}, unexpected {extra}")
    names = tuple(classes if classes is not None else folders)
    paths, targets, empty = [], [], []
    for t, name in enumerate(names):
        files = sorted(f for f in folders[name].rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        if not files:
            empty.append(name)
        paths.extend(files)
        targets.extend([t] * len(files))
    if empty:
        raise DataError(f"class folder(s) with no images in {str(root)!r}: {', '.join(empty)}")
    return LabeledImages(tuple(paths), tuple(targets), names)


def sample_shots(data: LabeledImages, shots: int, seed: int = 0) -> LabeledImages:
    """K images per class, reproducibly; a class with fewer than K images is an error."""
    if shots < 1:
        raise DataError(f"shots must be >= 1, got {shots}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c, idx in data.by_class().items():
        if len(idx) < shots:
            raise DataError(f"class {data.classes[c]!r} has {len(idx)} images, fewer than --shots {shots}")
        chosen.extend(sorted(rng.choice(idx, shots, replace=False).tolist()))
    return data.subset(chosen)


def split_per_class(data: LabeledImages, per_class: int, seed: int = 0) -> tuple[LabeledImages, LabeledImages]:
    """Stratified split: `per_class` images of each class go to the second part.

    Every class keeps at least one image in the first part, so a class needs `per_class + 1` images.
    """
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c, idx in data.by_class().items():
        if len(idx) < per_class + 1:
            raise DataError(
                f"class {data.classes[c]!r} has {len(idx)} image(s); a validation split of {per_class} per "
                f"class needs {per_class + 1} (add images or pass --val DIR)"
            )
        perm = rng.permutation(idx).tolist()
        second.extend(sorted(perm[:per_class]))
        first.extend(sorted(perm[per_class:]))
    return data.subset(sorted(first)), data.subset(sorted(second))
