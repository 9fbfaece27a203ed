"""Compute budgets: one duration for a whole fit, turned into schedules from measured step times.

A fit gets a budget (`--budget 5m`, `fit(..., budget="5m")`; default: `DEFAULT_BUDGETS` per device).
Each method states its own schedule (the paper's: CLIP-LoRA's 500 steps per shot, CoOp's epochs, the
number of augmented views its cache is built from); a few warm-up steps are timed on this machine,
and the schedule is cut to what still fits in the budget, after the work already done (feature
extraction) and a reserve for what follows training (calibration, the final evaluation). Explicit
`iters` / `epochs` win over the budget. The plan is logged on `PLAN_LOGGER` before the long work.

Everything reads time through `Budget.clock`, so tests drive the planning with a fake clock. Under
torchrun / accelerate launch the time spent and the measured cost of a unit are rank 0's, so every
rank plans the same schedule (and the ranks, which wait for each other, stay in step).
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from fsclip.distributed import world
from fsclip.errors import UsageError

__all__ = [
    "DEFAULT_BUDGETS",
    "PLAN_LOGGER",
    "Budget",
    "Progress",
    "Schedule",
    "format_seconds",
    "parse_duration",
    "resolve_budget",
]

PLAN_LOGGER = "fsclip.adapters.plan"  # plan and progress lines: the CLI shows them unless --quiet
plan_log = logging.getLogger(PLAN_LOGGER)

# Per device kind: CPU keeps every method's default fit to a few minutes; a GPU runs the papers' schedules.
DEFAULT_BUDGETS = {"cpu": "3m", "mps": "10m", "cuda": "30m"}
RESERVE = 0.1  # least share of the budget kept for what follows training (final encoding, calibration)
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([hms])")


def parse_duration(value: str | float | int | None) -> float:
    """`"90s"`, `"5m"`, `"2h"`, `"1h30m"`, `"1.5h"`, or seconds as a number; `"none"` / `inf`: no limit.

    Raises:
        UsageError: anything else, or a duration that is not positive.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip().lower() in ("none", "inf", "unlimited"):
        return math.inf
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise UsageError(f"budget must be a duration like 90s, 5m, 2h or 1h30m (or 'none'), got {value!r}") \
                    from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise UsageError(f"budget must be a duration like 90s, 5m, 2h or 1h30m (or 'none'), got {value!r}")
    if not seconds > 0:
        raise UsageError(f"budget must be > 0 seconds, got {value!r}")
    return seconds


def format_seconds(seconds: float) -> str:
    """`42s`, `3m05s`, `1h20m`; `unlimited` for inf."""
    if math.isinf(seconds):
        return "unlimited"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class Budget:
    """Seconds allowed for one fit, counted from construction on `clock`.

    `reserve`: seconds kept for the work that follows training (at least `RESERVE` of the budget;
    `fit` raises it to the method's estimate of that work).
    """

    seconds: float
    clock: Callable[[], float] = time.monotonic
    reserve: float = -1.0
    start: float = field(init=False)

    def __post_init__(self):
        self.start = self.clock()
        if self.reserve < 0:
            self.reserve = RESERVE * self.seconds if self.limited else 0.0

    @property
    def limited(self) -> bool:
        return not math.isinf(self.seconds)

    def elapsed(self) -> float:
        """Seconds since the fit started (rank 0's: every rank then takes the same decisions)."""
        return world.broadcast(self.clock() - self.start)

    def remaining(self) -> float:
        """Seconds left for work, the reserve for what follows training already taken off."""
        return self.seconds - self.reserve - self.elapsed()

    def describe(self) -> str:
        return format_seconds(self.seconds)


def resolve_budget(budget: Budget | str | float | None, device) -> Budget:
    """A `Budget` from what `fit(budget=...)` accepts; None: the device's default (`DEFAULT_BUDGETS`)."""
    if isinstance(budget, Budget):
        return budget
    if budget is None:
        kind = getattr(device, "type", str(device))
        budget = DEFAULT_BUDGETS.get(kind, DEFAULT_BUDGETS["cpu"])
    return Budget(parse_duration(budget))


@dataclass
class Schedule:
    """How much work a method does: its own default, what the budget allows, or what the user asked.

    `unit` is what is counted (optimisation steps, augmented views); `default` is the method's own
    schedule (the paper's), `fixed` the user's explicit count, which wins.
    """

    what: str  # e.g. "lora training"
    unit: str  # e.g. "step", "view"
    default: int
    fixed: int | None = None
    minimum: int = 1
    planned: int | None = None
    seconds_per_unit: float | None = None
    reason: str = ""

    def plan(self, budget: Budget, seconds_per_unit: float, done: int = 0, share: float = 1.0) -> int:
        """Units to run in all (`done` of them already run), given the measured cost of one.

        `share`: the fraction of the remaining budget this schedule may use (the rest is for later work).
        """
        seconds_per_unit = world.broadcast(seconds_per_unit)
        self.seconds_per_unit = seconds_per_unit
        if self.fixed is not None:
            self.planned = self.fixed
            eta = (self.fixed - done) * seconds_per_unit
            self.reason = "as given"
            if budget.limited and eta > budget.remaining():
                self.reason += f" (about {format_seconds(eta)}, over the {budget.describe()} budget)"
            return self.planned
        if not budget.limited:
            self.planned, self.reason = self.default, "the method's default schedule (no budget limit)"
            return self.planned
        affordable = done + int(max(0.0, budget.remaining() * share) / max(seconds_per_unit, 1e-9))
        if affordable >= self.default:
            self.planned, self.reason = self.default, "the method's default schedule fits the budget"
        else:
            self.planned = max(self.minimum, done, affordable)
            self.reason = f"cut from the default {self.default} to fit the {budget.describe()} budget"
        return self.planned

    def eta(self, done: int = 0) -> float:
        return max(0, (self.planned or 0) - done) * (self.seconds_per_unit or 0.0)

    def line(self, done: int = 0) -> str:
        per = self.seconds_per_unit or 0.0
        rate = f"{per:.3g} s/{self.unit}" if per >= 0.01 else f"{1 / max(per, 1e-9):.3g} {self.unit}s/s"
        return (f"{self.what}: {self.planned} {self.unit}s ({self.reason}); measured {rate}; "
                f"ETA {format_seconds(self.eta(done))}")

    def to_dict(self) -> dict:
        return {"what": self.what, "unit": self.unit, "default": self.default, "fixed": self.fixed,
                "planned": self.planned, "seconds_per_unit": None if self.seconds_per_unit is None
                else round(self.seconds_per_unit, 6), "reason": self.reason}


def median_seconds(durations: list[float]) -> float:
    """The typical cost of one unit: the median, the first (warm-up) run left out when there are others."""
    timed = durations[1:] if len(durations) > 1 else durations
    return statistics.median(timed)


class Progress:
    """A tqdm bar on a terminal; elsewhere (logs, CI) one `PLAN_LOGGER` line every `every` seconds."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool, clock: Callable[[], float] = time.monotonic,
                 every: float = 30.0, stream=None):
        self.total, self.desc, self.unit, self.clock, self.every = total, desc, unit, clock, every
        self.n = 0
        self.start = self.last = clock()
        stream = stream or sys.stderr
        enabled = enabled and world.is_main()
        tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=stream) if tty else None
        self.lines = enabled and not tty
        self.postfix: dict[str, str] = {}

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        self.postfix = {k: f"{v:.3f}" if isinstance(v, float) else str(v) for k, v in postfix.items()}
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
        elif self.lines:
            now = self.clock()
            if now - self.last >= self.every:
                self.last = now
                plan_log.info("%s", self.status(now))

    def status(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        spent = now - self.start
        eta = spent / self.n * (self.total - self.n) if self.n else math.nan
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        left = format_seconds(eta) if self.n else "?"
        return f"{self.desc}: {self.n}/{self.total} {self.unit}s{extra}, {format_seconds(spent)} spent, ETA {left}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
