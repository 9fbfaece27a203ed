"""Cross-validation on the training shots: where a method must choose, it chooses without the validation images.

With a handful of images per class, a validation split of one to four images cannot choose reliably,
and whatever chose cannot also report an honest accuracy. The folds here are stratified: each class's
images are spread over the folds, so every fold holds out about 1/F of every class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["cross_validate", "fold_count", "one_standard_error", "stratified_folds"]


def fold_count(shots: int, most: int = 5) -> int:
    """Folds for `shots` images per class: one image of each class held out per fold, up to `most` folds."""
    return max(2, min(most, shots))


def stratified_folds(targets: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """Held-out indices of each fold; fold f gets every class's images at positions f, f + F, ... of a shuffle.

    A class with fewer images than folds sits out of some folds (with one image per class each fold
    holds out a random 1/F of the classes' only image); no fold is empty when there are >= F images.
    """
    rng = np.random.default_rng([seed, 7])
    targets = targets.cpu().numpy()
    held: list[list[int]] = [[] for _ in range(folds)]
    offset = 0
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        for j, i in enumerate(idx):
            held[(offset + j) % folds].append(int(i))
        offset += len(idx)  # the next class starts where this one stopped: folds stay balanced
    return [torch.tensor(sorted(h), dtype=torch.long) for h in held if h]


def cross_validate(
    n: int, held_out: Sequence[torch.Tensor], candidates: Sequence,
    score: Callable[[object, int, torch.Tensor, torch.Tensor], tuple],
) -> tuple[object, dict, dict]:
    """The candidate with the best mean score over folds, each candidate's mean, and its per-fold scores.

    `score(candidate, fold, train_idx, held_idx)` returns a tuple compared lexicographically (larger
    is better, e.g. (accuracy, -NLL)); ties go to the earlier candidate, so list the safest first.
    """
    everything = torch.arange(n)
    means: dict = {}
    per_fold: dict = {}
    for cand in candidates:
        scores = []
        for fold, held in enumerate(held_out):
            mask = torch.ones(n, dtype=torch.bool)
            mask[held] = False
            scores.append(score(cand, fold, everything[mask], held))
        per_fold[cand] = scores
        means[cand] = tuple(float(np.mean([s[i] for s in scores])) for i in range(len(scores[0])))
    best = candidates[0]
    for cand in candidates[1:]:
        if means[cand] > means[best]:
            best = cand
    return best, means, per_fold


def one_standard_error(candidates: Sequence, per_fold: dict) -> object:
    """The first (simplest) candidate whose mean accuracy is within one standard error of the best's.

    Breiman's one-standard-error rule: with a few images per fold, a small lead in cross-validated
    accuracy is noise, and the simpler choice is the safer one. Scores' first element is the accuracy.
    """
    acc = {c: np.array([s[0] for s in per_fold[c]], dtype=float) for c in candidates}
    best = max(candidates, key=lambda c: acc[c].mean())
    se = acc[best].std(ddof=1) / np.sqrt(len(acc[best])) if len(acc[best]) > 1 else 0.0
    return next(c for c in candidates if acc[c].mean() >= acc[best].mean() - se)
