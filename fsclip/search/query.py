"""What a search asks for: metadata filters (`Where`), and positive/negative queries combined into one vector."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import datetime

import torch

from fsclip.errors import UsageError

__all__ = ["Where", "combine_queries", "parse_time"]


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
        for name in ("modified_after", "modified_before"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value)):
                raise UsageError(f"{name} must be seconds since the epoch, got {value!r}")
        for name in ("min_width", "max_width", "min_height", "max_height"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise UsageError(f"{name} must be a non-negative integer, got {value!r}")
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
        if self.path_glob is not None:
            conds.append("path GLOB :w_glob")
            params["w_glob"] = self.path_glob
        if self.path_prefix is not None:
            conds.append("substr(path, 1, :w_prefix_len) = :w_prefix")
            params.update(w_prefix_len=len(self.path_prefix), w_prefix=self.path_prefix)
        if self.modified_after is not None:
            conds.append("mtime_ns >= :w_after")
            params["w_after"] = int(self.modified_after * 1e9)
        if self.modified_before is not None:
            conds.append("mtime_ns < :w_before")
            params["w_before"] = int(self.modified_before * 1e9)
        for name, column, op in (("min_width", "width", ">="), ("max_width", "width", "<="),
                                 ("min_height", "height", ">="), ("max_height", "height", "<=")):
            value = getattr(self, name)
            if value is not None:
                conds.append(f"{column} {op} :w_{name}")
                params[f"w_{name}"] = value
        return (" AND ".join(conds) or "1"), params


def parse_time(text: str, option: str = "time") -> float:
    """`YYYY-MM-DD`, `YYYY-MM-DDTHH:MM[:SS][+TZ]` (local time when no zone) or epoch seconds -> epoch seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise UsageError(
            f"invalid {option} {text!r}; use YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS] or seconds since the epoch"
        ) from None


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
