"""What a search asks for: metadata filters (`Where`), and positive/negative queries combined into one vector."""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, fields
from datetime import datetime, timezone

import torch

from fsclip.errors import UsageError

__all__ = ["Where", "check_glob", "combine_queries", "glob_regex", "parse_time"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# Times a filter can name: the dates Python can write (years 1-9999, any time zone). mtimes are stored
# as int64 nanoseconds (years 1678-2262), so bounds beyond those are clamped: same answer, no overflow.
# A day of slack each side: 0001-01-01 in a zone east of UTC is still 0000-12-31 in UTC.
MIN_TIME = (datetime(1, 1, 1, tzinfo=timezone.utc) - _EPOCH).total_seconds() - 86400
MAX_TIME = (datetime(9999, 12, 31, tzinfo=timezone.utc) - _EPOCH).total_seconds() + 2 * 86400
MAX_SIDE = 2**31 - 1  # image sides are C ints in PIL and every format it reads
_INT64 = 2**63 - 1
_TIME_RANGE = "a date from 0001-01-01 to 9999-12-31, or seconds since the epoch within those dates"


@dataclass(frozen=True)
class Where:
    """Metadata filter; every field that is set must hold (AND).

    Attributes:
        path_glob: SQLite GLOB over the full absolute path; `*` also matches `/`, so `*.png` and
            `*/beach/*` work. Case-sensitive.
        path_prefix: plain string prefix of the absolute path, e.g. `/photos/2023/`.
        modified_after: file modification time >= this (seconds since the epoch).
        modified_before: file modification time < this (seconds since the epoch).
        min_width, max_width, min_height, max_height: image size in pixels, bounds inclusive.
    """

    path_glob: str | None = None
    path_prefix: str | None = None
    modified_after: float | None = None
    modified_before: float | None = None
    min_width: int | None = None
    max_width: int | None = None
    min_height: int | None = None
    max_height: int | None = None

    def __post_init__(self) -> None:
        for name in ("path_glob", "path_prefix"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise UsageError(f"{name} must be a non-empty string, got {value!r}")
        if self.path_glob is not None:
            check_glob(self.path_glob, "path_glob")
        for name in ("modified_after", "modified_before"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value) or not MIN_TIME <= value <= MAX_TIME):
                raise UsageError(f"{name} must be {_TIME_RANGE}, got {value!r}")
        for name in ("min_width", "max_width", "min_height", "max_height"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_SIDE):
                raise UsageError(f"{name} must be an integer from 0 to {MAX_SIDE}, got {value!r}")
        for lo, hi in (("modified_after", "modified_before"), ("min_width", "max_width"),
                       ("min_height", "max_height")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise UsageError(f"empty range: {lo}={a!r} is after {hi}={b!r}")

    @classmethod
    def from_dict(cls, d: dict | Where | None) -> Where | None:
        if d is None or isinstance(d, Where):
            return d
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"unknown filter {unknown[0]!r}; choose from: {', '.join(sorted(known))}")
        return cls(**d)

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def to_sql(self) -> tuple[str, dict]:
        """A SQL condition over the `files` table with named parameters ("1" when nothing is set)."""
        conds: list[str] = []
        params: dict = {}
        # paths are stored as bytes: GLOB matches their text form (UTF-8, as typed), prefixes compare bytes
        if self.path_glob is not None:
            conds.append("CAST(path AS TEXT) GLOB CAST(:w_glob AS TEXT)")
            params["w_glob"] = os.fsencode(self.path_glob)
        if self.path_prefix is not None:
            prefix = os.fsencode(self.path_prefix)
            conds.append("substr(path, 1, :w_prefix_len) = :w_prefix")
            params.update(w_prefix_len=len(prefix), w_prefix=prefix)
        if self.modified_after is not None:
            conds.append("mtime_ns >= :w_after")
            params["w_after"] = _ns(self.modified_after)
        if self.modified_before is not None:
            conds.append("mtime_ns < :w_before")
            params["w_before"] = _ns(self.modified_before)
        for name, column, op in (("min_width", "width", ">="), ("max_width", "width", "<="),
                                 ("min_height", "height", ">="), ("max_height", "height", "<=")):
            value = getattr(self, name)
            if value is not None:
                conds.append(f"{column} {op} :w_{name}")
                params[f"w_{name}"] = value
        return (" AND ".join(conds) or "1"), params


    def bounds_ns(self) -> tuple[int | None, int | None]:
        """`(modified_after, modified_before)` as int64 nanoseconds (None where unset)."""
        return (None if self.modified_after is None else _ns(self.modified_after),
                None if self.modified_before is None else _ns(self.modified_before))

    def matches(self, path: str, mtime_ns: int, width: int | None, height: int | None) -> bool:
        """Whether one entry passes the filter (what `to_sql` selects, for engines that filter elsewhere)."""
        if self.path_glob is not None and not glob_regex(self.path_glob).fullmatch(path):
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        after, before = self.bounds_ns()
        if (after is not None and mtime_ns < after) or (before is not None and mtime_ns >= before):
            return False
        for value, lo, hi in ((width, self.min_width, self.max_width), (height, self.min_height, self.max_height)):
            if (lo is not None or hi is not None) and value is None:
                return False  # SQL: a comparison with NULL is not true
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                return False
        return True


@functools.lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern:
    """SQLite's GLOB as a regular expression (use `fullmatch`): `*` any run (`/` too), `?` one character,
    `[...]` a class (`[^...]` negated, `]` first is a member, `a-z` ranges); case-sensitive."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i + 1
            negate = j < len(pattern) and pattern[j] == "^"
            j += negate
            start = j
            j += j < len(pattern) and pattern[j] == "]"
            end = pattern.index("]", j)  # `check_glob` guarantees one
            members = "".join("\\" + ch if ch in "\\^[]" else ch for ch in pattern[start:end])
            out.append(f"[{'^' if negate else ''}{members}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _ns(seconds: float) -> int:
    """Seconds -> int64 nanoseconds, clamped (no stored mtime lies beyond int64)."""
    return max(-_INT64 - 1, min(_INT64, int(seconds * 1e9)))


def parse_time(text: str, option: str = "time") -> float:
    """`YYYY-MM-DD`, `YYYY-MM-DDTHH:MM[:SS][+TZ]` (local time when no zone) or epoch seconds -> epoch seconds.

    Years 1 to 9999 are accepted; epoch seconds beyond those dates are an error.
    """
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise UsageError(
                f"invalid {option} {text!r}; use YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS] or seconds since the epoch"
            ) from None
        if when.tzinfo is None:
            try:
                return when.timestamp()
            except (OverflowError, OSError, ValueError):  # local time near year 1 or 9999: today's offset
                when = when.replace(tzinfo=datetime.now().astimezone().tzinfo)
        seconds = (when - _EPOCH).total_seconds()
    if not math.isfinite(seconds) or not MIN_TIME <= seconds <= MAX_TIME:
        raise UsageError(f"{option} {text!r} is out of range: give {_TIME_RANGE}")
    return seconds


def check_glob(pattern: str, option: str = "glob") -> None:
    """Refuse a pattern SQLite's GLOB can never match: a `[` class without its `]` (e.g. `--glob '['`).

    Same rules as SQLite: `]` right after `[` or `[^` is a literal member of the class.
    """
    i = 0
    while i < len(pattern):
        if pattern[i] != "[":
            i += 1
            continue
        j = i + 1
        j += j < len(pattern) and pattern[j] == "^"
        j += j < len(pattern) and pattern[j] == "]"
        end = pattern.find("]", j)
        if end < 0:
            raise UsageError(f"invalid {option} {pattern!r}: '[' at position {i} has no closing ']' "
                             "(match a literal '[' with '[[]')")
        i = end + 1


def combine_queries(positives: torch.Tensor, negatives: torch.Tensor | None = None,
                    negative_weight: float = 0.5) -> torch.Tensor:
    """(P, D) positives, (Q, D) negatives -> one (D,) query vector.

    The inner product with the result is exactly `mean_i <x, p_i> - w * mean_j <x, n_j>`, so a score
    reads as "mean similarity to the positives minus w times mean similarity to the negatives". The
    vector is deliberately not renormalised: that would rescale scores without changing the ranking.
    """
    if positives.ndim != 2 or len(positives) == 0:
        raise UsageError("give at least one positive query (text or image); negatives alone rank nothing")
    if not math.isfinite(negative_weight) or negative_weight < 0:
        raise UsageError(f"negative_weight must be >= 0, got {negative_weight!r}")
    q = positives.float().mean(0)
    if negatives is not None and len(negatives):
        q = q - negative_weight * negatives.float().mean(0)
    return q
