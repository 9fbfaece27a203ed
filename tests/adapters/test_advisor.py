"""The strategy advisor follows the strategy matrix, from measurements it reports."""

from __future__ import annotations

import pytest

from fsclip.adapters import AdvisorConfig, advise, fit
from fsclip.data import LabeledImages, sample_shots


def _only(data: LabeledImages, names: tuple[str, ...]) -> LabeledImages:
    keep = [i for i, t in enumerate(data.targets) if data.classes[t] in names]
    remap = {data.classes.index(n): j for j, n in enumerate(names)}
    return LabeledImages(tuple(data.paths[i] for i in keep), tuple(remap[data.targets[i]] for i in keep), names)


BASE = ("circle", "square", "triangle", "star", "cross", "hexagon")
NOVEL = ("diamond", "crescent", "ring")


@pytest.mark.parametrize(("shots", "expected"), [(2, "tip-adapter"), (16, "linear-probe")])
def test_small_data_similar_domain_keeps_the_backbone_frozen(shots, expected, shapes_task, shapes_backend):
    train = sample_shots(_only(shapes_task.pool, BASE), shots, seed=0)
    advice = advise(shapes_backend, train, _only(shapes_task.val, BASE), "shapes")
    assert advice.method == expected
    assert advice.measurements["domain"] == "similar" and advice.measurements["data size"] == "small"
    assert advice.measurements["zero-shot above chance"] >= 0.6


def test_small_data_different_domain_adapts_attention(shapes_task, shapes_backend):
    advice = advise(shapes_backend, _only(shapes_task.pool, NOVEL), _only(shapes_task.val, NOVEL), "shapes")
    assert advice.measurements["domain"] == "different"
    assert advice.measurements["frozen probe val accuracy"] < 0.95
    assert advice.method == "lora"
    assert "different domain" in advice.reason


def test_medium_and_large_data_fine_tune(shapes_task, shapes_backend):
    medium = AdvisorConfig(small_images=100, large_images=1000)
    large = AdvisorConfig(small_images=10, large_images=100)
    assert advise(shapes_backend, shapes_task.pool, shapes_task.val, "shapes", medium).method == "partial-ft"
    advice = advise(shapes_backend, shapes_task.pool, shapes_task.val, "shapes", large)
    assert advice.method == "full-ft" and "large data" in advice.reason


def test_fit_auto_records_the_advice_and_applies_matching_options(shapes_task, shapes_backend):
    train = sample_shots(_only(shapes_task.pool, BASE), 2, seed=0)
    adapter = fit(shapes_backend, train, "auto", val=_only(shapes_task.val, BASE), templates="shapes", iters=5)
    assert adapter.name == "tip-adapter"  # iters does not apply to it: dropped with a warning
    advice = adapter.metrics["advice"]
    assert advice["method"] == "tip-adapter" and advice["reason"]
    assert advice["measurements"]["images per class (min)"] == 2
