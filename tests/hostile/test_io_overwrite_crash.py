"""`atomic_dir` overwrite killed at every step: there is always one complete folder, and no copy is lost."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The child overwrites FOLDER (holding data = "old") with data = "new" and dies (os._exit, so no cleanup
# code runs, as with kill -9 or a power cut) just before its Nth rename/exchange/delete, or just after.
CHILD = textwrap.dedent("""
    import os, shutil, sys
    import fsclip._io as io

    folder, n, when, exchange = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    if not exchange:
        io._exchange = None  # the fallback for systems without rename-exchange
    calls = [0]

    def dying(fn):
        def step(*a, **kw):
            calls[0] += 1
            if calls[0] == n and when == "before":
                os._exit(17)
            out = fn(*a, **kw)
            if calls[0] == n and when == "after":
                os._exit(17)
            return out
        return step

    io.os.replace = dying(os.replace)
    io.shutil.rmtree = dying(shutil.rmtree)
    if io._exchange is not None:
        io._exchange = dying(io._exchange)
    with io.atomic_dir(folder, overwrite=True) as tmp:
        (tmp / "data").write_text("new")
        (tmp / "more").write_text("new")
    os._exit(0)
""")


def _overwrite(folder: Path, n: int, when: str, exchange: bool) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(n), when, "1" if exchange else "0"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 17), proc.stderr
    return proc.returncode


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir()}


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_io_overwrite_killed_at_each_step(tmp_path, exchange):
    from fsclip import _io

    if exchange and _io._exchange is None:
        pytest.skip("this OS has no rename-exchange")
    crashes = 0
    for n in range(1, 10):
        for when in ("before", "after"):
            case = tmp_path / f"{n}-{when}"
            folder = case / "out"
            folder.mkdir(parents=True)
            (folder / "data").write_text("old")
            (folder / "keep").write_text("old")
            crashes += _overwrite(folder, n, when, exchange) == 17
            whole = ({"data": "old", "keep": "old"}, {"data": "new", "more": "new"})
            if exchange:  # `folder` is never missing nor half written, at any instant
                assert folder.is_dir() and _contents(folder) in whole, (n, when)
            # the next reader recovers first (as ImageIndex.open does) and sees one whole folder
            _io.recover_dir(folder)
            assert _contents(folder) in whole, (n, when)
            # the next write succeeds and cleans up whatever the crash left behind
            with _io.atomic_dir(folder, overwrite=True) as tmp:
                (tmp / "data").write_text("third")
            assert _contents(folder) == {"data": "third"}
            assert sorted(p.name for p in case.iterdir()) == ["out"], (n, when)
    assert crashes >= 4  # the child really died at several different steps
