"""ONNX Runtime sessions: one per (model file, thread count) per process, with fsclip's options."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

__all__ = ["clear_sessions", "get_session"]

# ORT's pool threads spin while waiting for work by default. fsclip decodes images in threads while the
# model runs, and spinning threads take the cores those decoders need (see eval/bench_runtime.py).
ALLOW_SPINNING = False

_SESSIONS: dict[tuple, object] = {}
_LOCK = threading.Lock()


def _options(threads: int, spinning: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    # the user's thread setting (torch.set_num_threads, OMP_NUM_THREADS) governs ORT too
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3  # errors only: ORT's warnings are about its internals
    return so


def get_session(path: Path):
    """An `onnxruntime.InferenceSession` for `path` on the CPU, built once per process and thread count.

    A file that was replaced since (another inode or mtime) gets a new session.
    """
    import onnxruntime as ort

    threads, spinning = torch.get_num_threads(), ALLOW_SPINNING
    st = Path(path).stat()
    key = (str(path), st.st_ino, st.st_mtime_ns, threads, spinning)
    with _LOCK:
        session = _SESSIONS.get(key)
        if session is None:
            for old in [k for k in _SESSIONS if k[0] == key[0] and k[1:3] != key[1:3]]:
                del _SESSIONS[old]  # the file was replaced
            session = ort.InferenceSession(str(path), _options(threads, spinning), providers=["CPUExecutionProvider"])
            _SESSIONS[key] = session
        return session


def clear_sessions() -> None:
    """Drop every cached session (their memory goes when the last backend using them does)."""
    with _LOCK:
        _SESSIONS.clear()
