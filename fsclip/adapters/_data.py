"""Checks on labelled sets and the default validation split used when none is given."""

from __future__ import annotations

import numpy as np

from fsclip.data import LabeledImages, sample_shots, split_per_class
from fsclip.errors import DataError

__all__ = ["check_pair", "check_trainable", "holdout_split"]


def check_trainable(data: LabeledImages, what: str = "training") -> None:
    """At least two classes and at least one image in each."""
    if len(data.classes) < 2:
        raise DataError(f"{what} set has {len(data.classes)} class(es); a classifier needs at least 2")
    empty = [name for name, n in data.counts().items() if n == 0]
    if empty:
        raise DataError(f"{what} class(es) with no images: {', '.join(empty)}")


def check_pair(train: LabeledImages, val: LabeledImages) -> None:
    """Validation must use exactly the training classes, in the same order."""
    if tuple(train.classes) != tuple(val.classes):
        missing = sorted(set(train.classes) - set(val.classes))
        extra = sorted(set(val.classes) - set(train.classes))
        detail = f"missing {missing}, unexpected {extra}" if missing or extra else "same names, other order"
        raise DataError(f"validation classes differ from training: {detail}")
    check_trainable(val, "validation")


def holdout_split(data: LabeledImages, shots: int | None = None, seed: int = 0) -> tuple[LabeledImages, LabeledImages]:
    """(train, val) from one labelled set, stratified as CoOp does: min(k, 4) validation images per class.

    With `shots` K: K training images per class (the same ones `sample_shots(data, K, seed)` picks) and
    min(K, 4) validation images per class from the rest. Without: k = the smallest class size, and
    min(k // 2, 4) per class go to validation, so training keeps at least as many as validation.
    """
    check_trainable(data)
    if shots is None:
        smallest = min(data.counts().values())
        return split_per_class(data, max(1, min(smallest // 2, 4)), seed)
    train = sample_shots(data, shots, seed)
    per_class = min(shots, 4)
    chosen = set(_positions(data, train))
    rng = np.random.default_rng([seed, 1])
    val_idx = []
    for c, idx in data.by_class().items():
        rest = [i for i in idx if i not in chosen]
        if len(rest) < per_class:
            raise DataError(
                f"class {data.classes[c]!r} has {len(idx)} image(s); --shots {shots} plus a validation split "
                f"of {per_class} per class needs {shots + per_class} (add images, lower --shots or pass --val DIR)"
            )
        val_idx.extend(sorted(rng.choice(rest, per_class, replace=False).tolist()))
    return train, data.subset(sorted(val_idx))


def _positions(data: LabeledImages, part: LabeledImages) -> list[int]:
    where = {p: i for i, p in enumerate(data.paths)}
    return [where[p] for p in part.paths]
