"""Compute budgets: durations, plans from measured step times, re-planning, progress lines.

Time here is a fake clock that only moves when the test (or a hook on the model) moves it, so every
figure is exact and nothing depends on how busy the machine is.
"""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch

from fsclip.adapters import fit
from fsclip.adapters._budget import PLAN_LOGGER, Budget, Progress, Schedule, parse_duration, resolve_budget
from fsclip.adapters._features import encode_views
from fsclip.adapters._train import FeatureBatches, run_training
from fsclip.errors import UsageError


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("5m", 300), ("2h", 7200), ("1h30m", 5400),
                                               ("1.5h", 5400), (" 2M ", 120), ("300", 300), (45, 45),
                                               (2.5, 2.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["none", "inf", "NONE"])
def test_no_limit(text):
    assert math.isinf(parse_duration(text))


@pytest.mark.parametrize("text", ["5 minutes", "abc", "-1m", "0", "", "5m3", "m", True, None, [5]])
def test_bad_durations_are_one_line_usage_errors(text):
    with pytest.raises(UsageError) as err:
        parse_duration(text)
    assert "budget" in str(err.value) and "\n" not in str(err.value)


def test_default_budget_per_device():
    assert resolve_budget(None, torch.device("cpu")).seconds == 180
    assert resolve_budget(None, torch.device("cuda")).seconds == 1800
    assert resolve_budget("5m", torch.device("cpu")).seconds == 300


def test_schedule_keeps_the_default_when_it_fits_and_cuts_it_when_not():
    clock = FakeClock()
    budget = Budget(100, clock=clock)  # 90 s of work after the 10 % reserve
    fits = Schedule("x", "step", default=50)
    assert fits.plan(budget, seconds_per_unit=1.0) == 50 and "fits" in fits.reason
    cut = Schedule("x", "step", default=500)
    assert cut.plan(budget, seconds_per_unit=1.0) == 90 and "cut from the default 500" in cut.reason
    clock.advance(30)  # work already done (e.g. feature extraction) counts
    assert Schedule("x", "step", default=500).plan(budget, 1.0, done=3) == 3 + 60
    half = Schedule("x", "view", default=500)
    assert half.plan(budget, 1.0, share=0.5) == 30  # only a share of what is left


def test_explicit_counts_win_over_the_budget_and_say_so():
    s = Schedule("x", "step", default=500, fixed=400)
    assert s.plan(Budget(100, clock=FakeClock()), seconds_per_unit=1.0) == 400
    assert "over the 1m40s budget" in s.reason
    assert Schedule("x", "step", default=5, fixed=400).plan(Budget(math.inf), 1.0) == 400


def _toy_problem(clock: FakeClock, step_seconds):
    """A least-squares fit whose every step costs `step_seconds(step)` on the fake clock."""
    w = torch.nn.Parameter(torch.zeros(4))
    x, y = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(64, dtype=torch.long)
    calls = []

    def loss_fn(inputs, _targets):
        calls.append(1)
        clock.advance(step_seconds(len(calls)))
        return (inputs @ w).pow(2).mean() + (w - 1).pow(2).sum()

    batches = FeatureBatches(x[None], y, 16, seed=0)
    return w, batches, loss_fn, torch.optim.SGD([w], lr=0.1)


def test_training_runs_what_fits_in_the_budget():
    clock = FakeClock()
    budget = Budget(100, clock=clock)
    w, batches, loss_fn, opt = _toy_problem(clock, lambda step: 1.0)
    schedule = Schedule("toy", "step", default=1000)
    result = run_training(params={"w": w}, optimizer=opt, batches=batches, loss_fn=loss_fn, schedule=schedule,
                          budget=budget)
    assert result.steps == schedule.planned == 90  # 3 timed steps, then 87 more: 90 s of the 100 s budget
    assert clock.t <= budget.seconds
    assert result.schedule["default"] == 1000 and "cut" in result.schedule["reason"]


def test_training_re_plans_when_steps_get_slower():
    clock = FakeClock()
    budget = Budget(100, clock=clock)
    w, batches, loss_fn, opt = _toy_problem(clock, lambda step: 0.5 if step <= 10 else 2.0)  # the machine gets busy
    schedule = Schedule("toy", "step", default=1000)
    result = run_training(params={"w": w}, optimizer=opt, batches=batches, loss_fn=loss_fn, schedule=schedule,
                          budget=budget)
    first_plan = 3 + int((90 - 1.5) / 0.5)  # what the first three steps promised
    assert result.steps < first_plan
    assert clock.t <= budget.seconds  # the reserve absorbs the steps run before the re-plan noticed


def test_explicit_iters_run_in_full_however_long():
    clock = FakeClock()
    w, batches, loss_fn, opt = _toy_problem(clock, lambda step: 1.0)
    result = run_training(params={"w": w}, optimizer=opt, batches=batches, loss_fn=loss_fn,
                          schedule=Schedule("toy", "step", default=1000, fixed=150), budget=Budget(100, clock=clock))
    assert result.steps == 150 and clock.t == 150


def test_progress_logs_a_line_every_interval_when_not_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger=PLAN_LOGGER)
    clock = FakeClock()
    bar = Progress(10, "lora", "step", enabled=True, clock=clock, every=30, stream=io.StringIO())
    for _ in range(10):
        clock.advance(10)
        bar.update(1, loss=0.5)
    bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == PLAN_LOGGER]
    assert len(lines) == 3  # at 30, 60 and 90 s
    assert lines[0] == "lora: 3/10 steps, loss 0.500, 30s spent, ETA 1m10s"


def test_progress_is_a_bar_on_a_terminal_and_silent_when_disabled(caplog):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    caplog.set_level(logging.INFO, logger=PLAN_LOGGER)
    clock = FakeClock()
    term = Terminal()
    for enabled, stream in ((True, term), (False, io.StringIO())):
        bar = Progress(5, "x", "step", enabled=enabled, clock=clock, every=1, stream=stream)
        for _ in range(5):
            clock.advance(10)
            bar.update(1)
        bar.close()
    assert not [r for r in caplog.records if r.name == PLAN_LOGGER]
    assert "x:" in term.getvalue() and "/5 [" in term.getvalue()  # tqdm drew on the terminal


def _tick_per_forward(backend, clock: FakeClock, seconds: float):
    """Each image-tower forward costs `seconds` on the fake clock (a hook on the real model)."""
    return backend.image_tower.register_forward_hook(lambda *_: clock.advance(seconds))


def test_augmented_views_are_cut_to_the_budget(tiny_openclip, small_task):
    clock = FakeClock()
    handle = _tick_per_forward(tiny_openclip, clock, 1.0)  # one batch per view here: 1 s per view
    try:
        views, schedule = encode_views(tiny_openclip, small_task.pool.paths, 20, 0.5, True, seed=123,
                                       budget=Budget(10, clock=clock))
    finally:
        handle.remove()
    assert views.shape[:2] == (9, len(small_task.pool))  # 1 timed view + 8 more: 9 s of the 10 s budget
    assert schedule.planned == 9 and "cut from the default 20" in schedule.reason
    again, cached = encode_views(tiny_openclip, small_task.pool.paths, 9, 0.5, True, seed=123, fixed=True)
    assert torch.equal(again, views) and cached.reason == "all cached"


def test_a_whole_fit_ends_within_its_budget(tiny_openclip, small_task):
    clock = FakeClock()
    handle = _tick_per_forward(tiny_openclip, clock, 3.0)  # 3 s per batch of images: 10 views would take 30 s
    try:
        adapter = fit(tiny_openclip, small_task.pool, "tip-adapter-f", val=small_task.val, templates="generic",
                      budget=Budget(30, clock=clock))
    finally:
        handle.remove()
    views = adapter.selection["views"]
    assert views["default"] == 10 and views["planned"] < 10
    assert adapter.metrics["budget"]["total_seconds"] <= 30
