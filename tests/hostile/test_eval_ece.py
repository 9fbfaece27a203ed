"""The validation ECE `fit` writes to metrics.json and the test ECE of `fsclip eval` are one statistic
(issue 9, item 26): they used to bin confidences at opposite edges, (lo, hi] and [lo, hi)."""

from __future__ import annotations

import torch

from fsclip.adapters._calibration import expected_calibration_error
from fsclip.evaluation.metrics import classification_metrics


def test_user_compares_the_fit_ece_with_the_eval_ece_on_the_same_predictions():
    # confidences exactly on a bin edge (0.4 with 5 bins) are where the two conventions disagree:
    # (lo, hi] gave 0.55 here, [lo, hi) gives 0.05
    probs = torch.tensor([[0.4, 0.3, 0.3], [0.5, 0.25, 0.25]])
    targets = torch.tensor([0, 1])
    from_fit = expected_calibration_error(probs, targets, bins=5)
    from_eval = classification_metrics(probs, targets, ["a", "b", "c"], bins=5)["ece"]
    assert from_fit == from_eval
    assert abs(from_eval - 0.05) < 1e-6
