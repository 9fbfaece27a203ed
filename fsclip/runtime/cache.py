"""Cache entries under `$FSCLIP_CACHE/onnx/`: exported models, their manifest, and their gate record.

One folder per (weights, behaviour, runtime, versions):

    <backend>-<fingerprint>-<behaviour>-<runtime>-ort<v>-opset<n>-torch<v>-fsclip<v>/
        image.onnx, text.onnx   (no text.onnx for image-only models; + .data side files for very large towers)
        models.json             what was written, with sizes; or why export failed
        gates.json              the accuracy gate's figures (written after the models)

The models and manifest appear together (temp folder + rename); the gate record is its own atomic
file, so a missing or damaged record means "gate again", and damaged models mean "export again".
A lock file beside the folder keeps two processes from building the same entry at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fsclip._cache import cache_dir
from fsclip._io import atomic_write
from fsclip._version import __version__
from fsclip.backends.base import Backend

__all__ = ["GATES", "MANIFEST", "entry_dir", "locked", "read_gates", "read_manifest", "write_gates"]

MANIFEST, GATES = "models.json", "gates.json"


def entry_dir(backend: Backend, runtime: str) -> Path:
    import onnxruntime
    import torch

    from fsclip.runtime.export import OPSET

    torch_version = torch.__version__.split("+")[0]
    key = (f"{backend.name}-{backend.fingerprint}-{behaviour(backend)}-{runtime}-ort{onnxruntime.__version__}"
           f"-opset{OPSET}-torch{torch_version}-fsclip{__version__}")
    return cache_dir("onnx") / key


_BEHAVIOUR: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def behaviour(backend: Backend) -> str:
    """A short hash of what the towers compute on a fixed probe.

    The fingerprint covers the weights only; configuration that changes no weight (a text tower's
    causal mask or pooling, say) changes the graph, so it must change the cache key too. Features are
    rounded to 2 decimals, far above run-to-run float noise and far below what a configuration changes.
    """
    import torch

    key = _BEHAVIOUR.get(backend.model)
    if key is None:
        size = backend.image_size
        pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 4 - 2
        with torch.inference_mode():
            feats = backend.forward_images(pixels.to(backend.device, backend.dtype)).float().cpu()
            if backend.has_text:
                text = backend.forward_texts(backend.tokenize(["a photo of a cat."])).float().cpu()
                feats = torch.cat([feats, text], 1)
        rounded = np.round(feats.numpy().astype(np.float64), 2) + 0.0  # + 0.0: no negative zeros
        key = hashlib.sha256(rounded.tobytes()).hexdigest()[:8]
        _BEHAVIOUR[backend.model] = key
    return key


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the entry's lock (released by the OS if the process dies)."""
    fd = os.open(folder.parent / f"{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def manifest(folder: Path, files: list[str]) -> dict:
    return {"fsclip_version": __version__, "files": {f: (folder / f).stat().st_size for f in files}}


def read_manifest(folder: Path) -> dict | None:
    """The manifest if every file it lists is there at its recorded size (or it records an export error)."""
    data = _read_json(folder / MANIFEST)
    if data is None:
        return None
    if "error" in data:
        return data
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        return None
    for name, size in files.items():
        try:
            if (folder / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return data


def write_manifest(folder: Path, data: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(data, indent=1) + "\n")


def read_gates(folder: Path) -> dict | None:
    return _read_json(folder / GATES)


def write_gates(folder: Path, record: dict) -> None:
    with atomic_write(folder / GATES, "w") as f:
        f.write(json.dumps(record, indent=1) + "\n")
