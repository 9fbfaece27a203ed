"""Roles kept apart: no method chooses on the validation images, which only report and calibrate."""

from __future__ import annotations

import pytest
import torch

from fsclip.adapters import fit, list_adapters
from fsclip.adapters._calibration import expected_calibration_error
from fsclip.data import LabeledImages


def _shuffled_labels(data: LabeledImages) -> LabeledImages:
    """The same images with their labels rotated: validation data that would mislead any choice made on it."""
    n = len(data.classes)
    return LabeledImages(data.paths, tuple((t + 1) % n for t in data.targets), data.classes)


@pytest.mark.parametrize("method", list_adapters())
def test_the_fitted_adapter_does_not_depend_on_the_validation_images(method, tiny_openclip, small_task, fast_options):
    cheaper = {"linear-probe": {"c_grid": (0.1, 10.0)}, "partial-ft": {"probe_init": False},
               "full-ft": {"probe_init": False}}  # the probe's own independence is the linear-probe case
    options = {"templates": "generic", "calibrate": False, **fast_options.get(method, {}), **cheaper.get(method, {})}
    a = fit(tiny_openclip, small_task.pool, method, val=small_task.val, **options)
    b = fit(tiny_openclip, small_task.pool, method, val=_shuffled_labels(small_task.test), **options)
    torch.testing.assert_close(a.logits_from_features(a.encode(small_task.test.paths)),
                               b.logits_from_features(b.encode(small_task.test.paths)), atol=1e-5, rtol=1e-5)
    assert a.metrics["val_accuracy_is_held_out"] and b.metrics["val_accuracy_is_held_out"]
    assert a.metrics["data_roles"]["validation images"] == "reported accuracy, temperature (calibration)"


def test_opt_in_early_stopping_says_the_reported_accuracy_is_not_held_out(tiny_openclip, small_task):
    adapter = fit(tiny_openclip, small_task.pool, "lora", val=small_task.val, templates="generic", iters=4,
                  keep_best=True)
    assert adapter.validation_uses == ["choosing the best step"]
    assert not adapter.metrics["val_accuracy_is_held_out"]
    assert "choosing the best step" in adapter.metrics["data_roles"]["validation images"]
    assert adapter.train_result["history"]  # the checks it ran


def test_calibration_error_is_also_reported_cross_fitted(tiny_openclip, small_task):
    adapter = fit(tiny_openclip, small_task.pool, "linear-probe", val=small_task.val, templates="generic")
    ece = adapter.metrics["val_ece"]
    assert set(ece) == {"uncalibrated", "calibrated", "calibrated_cross_fitted"}
    assert 0 <= ece["calibrated_cross_fitted"] <= 1
    logits = adapter.logits_from_features(adapter.encode(small_task.val.paths))
    y = torch.tensor(small_task.val.targets)
    assert ece["calibrated"] == pytest.approx(expected_calibration_error((logits / adapter.temperature).softmax(-1), y))
