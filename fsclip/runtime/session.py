"""ONNX Runtime sessions: one per (model file, thread count) per process, with fsclip's options."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

__all__ = ["clear_sessions", "get_session"]

_SESSIONS: dict[tuple[str, int, int], object] = {}
_LOCK = threading.Lock()


def _options(threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    # the user's thread setting (torch.set_num_threads, OMP_NUM_THREADS) governs ORT too
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: ORT's warnings are about its internals
    return so


def get_session(path: Path):
    """An `onnxruntime.InferenceSession` for `path` on the CPU, built once per process and thread count.

    A file that is replaced (new inode or mtime) gets a new session.
    """
    import onnxruntime as ort

    threads = torch.get_num_threads()
    st = Path(path).stat()
    key = (str(path), threads, st.st_ino ^ st.st_mtime_ns)
    with _LOCK:
        session = _SESSIONS.get(key)
        if session is None:
            session = ort.InferenceSession(str(path), _options(threads), providers=["CPUExecutionProvider"])
            _SESSIONS[key] = session
        return session


def clear_sessions() -> None:
    """Drop every cached session (their memory goes when the last backend using them does)."""
    with _LOCK:
        _SESSIONS.clear()
