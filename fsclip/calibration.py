"""Calibration metrics: confidence bins and expected calibration error (ECE), one definition for all of
fsclip: the validation ECE that `fit` records and the test ECE of `fsclip eval` are the same statistic.

Plain torch and nothing else, so every layer can use it (evaluation reports load without the adapters).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["calibration_bins", "ece_from_bins", "expected_calibration_error"]


def calibration_bins(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> dict[str, list[float]]:
    """Equal-width bins [k/B, (k+1)/B) of the top-1 confidence (a confidence of 1 goes in the last bin):
    per bin the count, the summed confidence and the number correct. Sums rather than means, so bins of
    several runs (seeds) pool exactly."""
    conf, pred = probs.detach().cpu().max(dim=-1)
    correct = (pred == targets.detach().cpu()).double()
    which = torch.clamp((conf.double() * bins).long(), max=bins - 1)
    return {
        "count": torch.bincount(which, minlength=bins).tolist(),
        "confidence_sum": torch.bincount(which, weights=conf.double(), minlength=bins).tolist(),
        "correct_sum": torch.bincount(which, weights=correct, minlength=bins).tolist(),
    }


def ece_from_bins(bins: Mapping[str, Sequence[float]]) -> float:
    """ECE (Guo et al., 2017): the count-weighted mean over bins of |accuracy - confidence|."""
    total = sum(bins["count"])
    return sum(abs(a - c) for a, c in zip(bins["correct_sum"], bins["confidence_sum"])) / max(total, 1)


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """Top-label ECE over equal-width confidence bins: the one definition fsclip uses, for the
    validation ECE of `fit` and the test ECE of `fsclip eval` alike."""
    return ece_from_bins(calibration_bins(probs, targets, bins))
