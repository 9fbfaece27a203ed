"""Temperature scaling and ECE against known answers."""

from __future__ import annotations

import torch

from fsclip.adapters._calibration import expected_calibration_error, fit_temperature


def _sample(n: int, classes: int, temperature: float, seed: int = 0):
    """Labels drawn from softmax(z / temperature): the calibrating temperature is known."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 4
    y = torch.multinomial((z / temperature).softmax(-1), 1, generator=g).squeeze(1)
    return z, y


def test_fit_temperature_recovers_the_true_temperature():
    for true_t in (0.5, 1.0, 3.0):
        z, y = _sample(4000, 10, true_t)
        assert abs(fit_temperature(z, y) - true_t) / true_t < 0.1


def test_calibrated_probabilities_have_low_ece_overconfident_high():
    z, y = _sample(4000, 10, 3.0)
    assert expected_calibration_error((z / 3.0).softmax(-1), y) < 0.03
    assert expected_calibration_error(z.softmax(-1), y) > 0.15
    assert expected_calibration_error((z / fit_temperature(z, y)).softmax(-1), y) < 0.03


def test_tiny_validation_sets_do_not_drive_temperature_to_zero():
    z = torch.eye(5) * 3  # five images, all right: plain NLL would want T -> 0
    assert fit_temperature(z, torch.arange(5)) > 0.3
