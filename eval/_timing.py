"""Fair measurement for the benchmarks: symmetric warm-up, interleaved repeats, median and spread,
peak memory read from the measured process itself, and an isolated fsclip cache.

    timings = compare({"fsclip": ours, "baseline": theirs}, repeats=5)   # both warmed up the same way
    print(timings["fsclip"].rate(n), "vs", timings["baseline"].rate(n))  # "412 (398-430)/s"
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["Timing", "compare", "isolated_cache", "markdown_table", "measure", "median_time", "peak_rss_mib"]


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed run of one workload."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.seconds), max(self.seconds)

    def rate(self, n: float, unit: str = "/s", digits: int | None = None) -> str:
        """`n` items per second as "median (slowest-fastest)"; one run shows the median alone."""
        fmt = _fmt(n / self.median, digits)
        if len(self.seconds) == 1:
            return f"{fmt}{unit}"
        lo, hi = n / max(self.seconds), n / min(self.seconds)
        return f"{fmt} ({_fmt(lo, digits)}-{_fmt(hi, digits)}){unit}"

    def time(self, unit: str = " s", digits: int = 2) -> str:
        """The median in seconds with the range of the runs."""
        if len(self.seconds) == 1:
            return f"{self.median:.{digits}f}{unit}"
        lo, hi = self.spread
        return f"{self.median:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f}){unit}"


def _fmt(x: float, digits: int | None) -> str:
    if digits is None:
        digits = 0 if x >= 100 else 1 if x >= 10 else 2
    return f"{x:.{digits}f}"


def measure(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> Timing:
    """`warmup` untimed calls, then `repeats` timed ones."""
    return compare({"fn": fn}, repeats, warmup)["fn"]


def compare(fns: dict[str, Callable[[], object]], repeats: int = 3, warmup: int = 1) -> dict[str, Timing]:
    """Time several ways of doing the same work, fairly.

    Every function gets the same warm-up (`warmup` untimed calls each, in turn), then the timed runs are
    interleaved round by round, the order rotating each round, so a machine that gets busier or quieter
    during the measurement, or caches that one run leaves warm for the next, affect all of them alike.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: Timing(tuple(t)) for name, t in times.items()}


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    return measure(fn, repeats, warmup).median


def peak_rss_mib(pid: int | str = "self") -> float:
    """Peak resident memory of process `pid` (VmHWM from /proc/<pid>/status), in MiB.

    Not `getrusage().ru_maxrss`: Linux carries it over from the parent through fork + exec, so a child of a
    large benchmark process would report the parent's peak. Read it in the measured process itself (or
    while it is still alive): /proc/<pid> is gone once the child has been reaped.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


@contextlib.contextmanager
def isolated_cache() -> Iterator[str]:
    """A fresh, empty `FSCLIP_CACHE` for this process and its children, removed afterwards: no benchmark
    reads label embeddings or features another one (or the user) cached."""
    saved = os.environ.get("FSCLIP_CACHE")
    with tempfile.TemporaryDirectory(prefix="fsclip-bench-cache-") as tmp:
        os.environ["FSCLIP_CACHE"] = tmp
        try:
            yield tmp
        finally:
            if saved is None:
                os.environ.pop("FSCLIP_CACHE", None)
            else:
                os.environ["FSCLIP_CACHE"] = saved


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
