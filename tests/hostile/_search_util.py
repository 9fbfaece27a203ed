"""Helpers for the hostile search/index/serve tests: photo folders, the tiny model, running the CLI."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fsclip.cli import main
from fsclip.shapes.world import BASE_SHAPES, COLOURS, render

COMBOS = [(c, s) for c in COLOURS for s in BASE_SHAPES]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_backend(tiny_openclip_dir):
    from fsclip.backends import load_model

    return load_model(str(tiny_openclip_dir), device="cpu")


def photos(folder: Path | bytes, n: int, seed: int = 0, size: int = 32, names=None) -> list[Path]:
    """`n` PNGs of one random coloured shape each, named `img<i>.png` unless `names` says otherwise."""
    rng = np.random.default_rng(seed)
    folder = Path(os.fsdecode(folder))
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        colour, shape = COMBOS[rng.integers(len(COMBOS))]
        path = folder / (names[i] if names else f"img{i:04d}.png")
        render(colour, shape, rng, size).save(path, format="PNG")
        out.append(path)
    return out


def cli(capsys, *argv) -> tuple[int, str, str]:
    """`fsclip ARGV` in this process: (exit code, stdout, stderr)."""
    rc = main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str, fragment: str) -> None:
    """stderr is exactly one `fsclip: error:` line naming the problem, and no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsclip: error: ") and fragment in lines[0], err


_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _PR_CAPBSET_DROP = 1, 2, 24


def _drop_permission_bypass() -> None:
    """In a child: drop root's capabilities that bypass file permissions, so mode 000 means unreadable."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):  # else exec as uid 0 grants them back
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    mask = ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    for field in ("effective", "permitted", "inheritable"):
        setattr(data[0], field, getattr(data[0], field) & mask)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def cli_without_root_bypass(*argv, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m fsclip ARGV` in a child for which permission bits hold even when the tests run as root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)}
    pre = _drop_permission_bypass if os.geteuid() == 0 else None
    return subprocess.run([sys.executable, "-m", "fsclip", *map(os.fspath, argv)], capture_output=True,
                          text=True, env=env, timeout=timeout, preexec_fn=pre, cwd="/")
