"""Output paths checked before any work: fsclip never writes where the user could lose data.

An output folder is new, or (with overwrite) one that fsclip wrote itself, recognised by a marker the
caller names: the demo's marker file, an adapter's config, a report's header. It is never an input,
never inside one, and a folder that is replaced never holds one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from fsclip.errors import UsageError

__all__ = ["check_output", "check_separate"]


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(
    path: str | os.PathLike,
    what: str,
    is_ours: Callable[[Path], bool],
    *,
    overwrite: bool = False,
    replaces: bool = True,
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
    writer: str = "fsclip",
) -> None:
    """Raise a one-line `UsageError` when writing `path` could lose data.

    Args:
        path: the output folder.
        what: how the user named it, for messages (`--out`, `adapter folder`).
        is_ours: True for an existing folder this kind of output wrote (its marker).
        overwrite: the user allowed replacing an existing folder (only one that `is_ours`).
        replaces: True when the folder is replaced as a whole (adapters, models); False when files are
            written into it (reports, result files), where an existing folder is fine if `is_ours` or empty.
        inputs: `(description, path)` of what the command reads; None entries are skipped.
        writer: who writes this kind of folder, for messages (`fsclip demo`).
    """
    name, real = repr(os.fspath(path)), _real(path)
    if real.parent == real:
        raise UsageError(f"{what} {name} is the filesystem root; choose a new folder")
    for described, source in inputs:
        if source is None or not os.path.exists(source):
            continue
        src = _real(source)
        if real == src:
            raise UsageError(f"{what} {name} is the {described}; choose a folder outside it")
        if _within(real, src):
            raise UsageError(f"{what} {name} is inside the {described} {os.fspath(source)!r}; choose a folder "
                             "outside it")
        if replaces and _within(src, real):
            raise UsageError(f"{what} {name} contains the {described} {os.fspath(source)!r}, which replacing "
                             "it would delete; choose another folder")
    if not os.path.lexists(path):
        return
    if not real.is_dir():
        raise UsageError(f"{what} {name} exists and is not a folder; choose a new folder name")
    if replaces:
        if not overwrite:
            raise UsageError(f"{what} {name} already exists; choose another folder or pass --overwrite")
        if not is_ours(real):
            raise UsageError(f"{what} {name} exists and was not written by {writer}; fsclip replaces only "
                             "folders it wrote, so choose another folder")
    elif not is_ours(real) and any(real.iterdir()):
        raise UsageError(f"{what} {name} is a folder {writer} did not write and is not empty; choose a new "
                         "or empty folder")


def check_separate(outputs: Sequence[tuple[str, str | os.PathLike | None]]) -> None:
    """Refuse two outputs of one command that are the same folder or one inside the other."""
    given = [(what, _real(p)) for what, p in outputs if p is not None]
    for i, (a, pa) in enumerate(given):
        for b, pb in given[i + 1:]:
            if pa == pb:
                raise UsageError(f"{a} and {b} name the same folder {str(pa)!r}; give each its own")
            if _within(pa, pb) or _within(pb, pa):
                raise UsageError(f"{a} and {b} are one inside the other ({str(pa)!r}, {str(pb)!r}); give each "
                                 "its own folder")
