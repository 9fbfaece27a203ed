"""The strategy advisor follows the strategy matrix, from measurements on the training images it
reports, and never picks a method whose default schedule cannot fit the budget on this device."""

from __future__ import annotations

import pytest

from fsclip.adapters import AdvisorConfig, Budget, advise, fit
from fsclip.data import LabeledImages, sample_shots


def _only(data: LabeledImages, names: tuple[str, ...]) -> LabeledImages:
    keep = [i for i, t in enumerate(data.targets) if data.classes[t] in names]
    remap = {data.classes.index(n): j for j, n in enumerate(names)}
    return LabeledImages(tuple(data.paths[i] for i in keep), tuple(remap[data.targets[i]] for i in keep), names)


BASE = ("circle", "square", "triangle", "star", "cross", "hexagon")
NOVEL = ("diamond", "crescent", "ring")


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("shots", [2, 8])
def test_small_data_similar_domain_keeps_the_backbone_frozen(shots, shapes_task, shapes_backend):
    # the base shapes, which zero-shot already names: no head beats it in cross-validation, so the
    # choice is the zero-shot classifier itself (the linear probe without a C)
    train = sample_shots(_only(shapes_task.pool, BASE), shots, seed=0)
    advice = advise(shapes_backend, train, "shapes", options={"views": 2, "epochs": 5})
    m = advice.measurements
    assert m["domain"] == "similar" and m["data size"] == "small"
    assert m["zero-shot above chance"] >= 0.6 and "zero-shot accuracy (training)" in m
    assert {f"{h} accuracy (cross-validated)" for h in ("zero-shot", "linear-probe", "tip-adapter", "clap")} <= set(m)
    assert advice.method == "linear-probe" and advice.options == {"c_grid": ()}
    assert "one standard error" in advice.reason


def test_a_head_that_beats_zero_shot_in_cross_validation_is_chosen(shapes_task, shapes_backend):
    # all 9 shapes at 8 shots: the novel ones are learnable, and zero-shot cannot name them
    train = sample_shots(shapes_task.pool, 8, seed=0)
    advice = advise(shapes_backend, train, "shapes", options={"views": 2, "epochs": 30, "c_grid": (1.0, 100.0)})
    m = advice.measurements
    assert m["domain"] == "similar"
    assert advice.method in ("linear-probe", "tip-adapter", "clap") and not advice.options
    assert m[f"{advice.method} accuracy (cross-validated)"] > m["zero-shot accuracy (cross-validated)"] + 0.05


def test_small_data_different_domain_adapts_attention(shapes_task, shapes_backend):
    advice = advise(shapes_backend, _only(shapes_task.pool, NOVEL), "shapes")
    assert advice.measurements["domain"] == "different"
    assert advice.measurements["frozen probe accuracy (cross-validated)"] < 0.95
    assert advice.method == "lora" and "different domain" in advice.reason


def test_a_method_whose_default_schedule_does_not_fit_is_not_chosen_and_the_advice_says_so(shapes_task,
                                                                                          shapes_backend):
    clock = FakeClock()

    def tick(*_):  # every batch through the image tower costs 1 s: a slow device
        clock.t += 1.0

    handle = shapes_backend.image_tower.register_forward_hook(tick)
    try:
        advice = advise(shapes_backend, _only(shapes_task.pool, NOVEL), "shapes", budget=Budget(600, clock=clock))
    finally:
        handle.remove()
    assert advice.method not in ("lora", "prolip", "partial-ft")
    assert advice.method == "clap"
    assert "lora's default schedule" in advice.compute and "does not fit" in advice.compute
    assert advice.compute.endswith("chose clap instead")
    assert advice.measurements["image forward (s/image)"] == 0.25  # 1 s per batch of 4 probe images


def test_medium_and_large_data_fine_tune(shapes_task, shapes_backend):
    medium = AdvisorConfig(small_images=100, large_images=1000)
    large = AdvisorConfig(small_images=10, large_images=100)
    assert advise(shapes_backend, shapes_task.pool, "shapes", medium).method == "partial-ft"
    advice = advise(shapes_backend, shapes_task.pool, "shapes", large)
    assert advice.method == "full-ft" and "large data" in advice.reason


def test_fit_auto_records_the_advice_and_applies_matching_options(shapes_task, shapes_backend):
    train = sample_shots(_only(shapes_task.pool, BASE), 2, seed=0)
    val = _only(shapes_task.val, BASE)
    adapter = fit(shapes_backend, train, "auto", val=val, templates="shapes", iters=5, views=2, epochs=3)
    assert adapter.name == "linear-probe" and adapter.config.c_grid == ()  # zero-shot won; iters, views dropped
    zero_shot = fit(shapes_backend, train, "linear-probe", val=val, templates="shapes", c_grid=())
    assert adapter.weight.equal(zero_shot.weight)
    advice = adapter.metrics["advice"]
    assert advice["method"] == "linear-probe" and advice["reason"]
    assert advice["measurements"]["images per class (min)"] == 2
    assert adapter.metrics["data_roles"]["validation images"] == "reported accuracy, temperature (calibration)"
