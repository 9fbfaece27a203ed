"""Inference runtimes: the same model's towers run by torch, or by ONNX Runtime in fp32 or int8.

`fsclip.backends.load_model(spec, runtime=...)` is the entry point; this package wraps the loaded torch
backend. `onnx` and `onnx-int8` export the towers once (cached under `$FSCLIP_CACHE/onnx/`), gate them
against torch on a calibration batch (`fsclip.runtime.gates`), and refuse a runtime that fails its gate.
`auto` picks the fastest runtime that passes on a CPU and stays with torch elsewhere.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from fsclip.backends.base import Backend
from fsclip.errors import ModelLoadError, UsageError

__all__ = ["ORT_RUNTIMES", "RUNTIMES", "RuntimeRefused", "apply_runtime", "check_runtime", "export_models",
           "require_onnx"]

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx", "onnx-int8", "auto")
ORT_RUNTIMES = ("onnx", "onnx-int8")


class RuntimeRefused(ModelLoadError):
    """An exported runtime that failed its accuracy gate (the message has the figures)."""


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    return runtime


def require_onnx(runtime: str = "onnx") -> None:
    """One line naming the install command when the ONNX packages are missing."""
    import importlib.util

    import torch

    for module in ("onnx", "onnxruntime", "onnxscript"):
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"runtime {runtime} needs the 'onnx' extra ({module} is missing): "
                             "pip install 'fsclip[onnx]'")
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 6):
        raise UsageError(f"runtime {runtime} needs torch >= 2.6 to export (this is {torch.__version__}): "
                         "pip install -U torch")


def apply_runtime(backend: Backend, runtime: str, calibration: Iterable | None = None) -> Backend:
    """`backend` with its towers run by `runtime`.

    Args:
        backend: a torch backend (for `onnx*`: on the CPU in fp32).
        runtime: one of `RUNTIMES`.
        calibration: images to gate on if the runtime is not gated yet: files, folders (walked lazily,
            only the first few images are read) or PIL images; shapes-world renders fill the rest.

    Raises:
        RuntimeRefused: the runtime failed its accuracy gate (now or when it was first gated).
        ExportError: the model cannot be exported (names the op and layer).
    """
    check_runtime(runtime)
    if runtime == "torch":
        return backend
    if runtime == "auto":
        return _auto(backend, calibration)
    require_onnx(runtime)
    return _prepare(backend, runtime, calibration)


def _auto(backend: Backend, calibration: Iterable | None) -> Backend:
    import torch

    if backend.device.type != "cpu" or backend.dtype != torch.float32:
        logger.warning("runtime auto: torch (%s %s; ONNX Runtime is used for fp32 on the CPU only)",
                       backend.device, str(backend.dtype).removeprefix("torch."))
        return backend
    try:
        require_onnx("auto")
    except UsageError as e:
        logger.warning("runtime auto: torch (%s)", e)
        return backend
    if calibration is not None and not isinstance(calibration, list | tuple):  # read twice below
        from fsclip.runtime.gates import CALIBRATION_IMAGES

        calibration = list(itertools.islice(calibration, 4 * CALIBRATION_IMAGES))
    refused = []
    for runtime in ("onnx-int8", "onnx"):
        try:
            chosen = _prepare(backend, runtime, calibration)
        except ModelLoadError as e:  # refused by its gate, or not exportable
            refused.append(f"{runtime}: {e}")
            continue
        logger.warning("runtime auto: %s (gate passed: %s)%s", runtime, _short(chosen.gate),
                       "".join(f"; {r}" for r in refused))
        return chosen
    logger.warning("runtime auto: torch (%s)", "; ".join(refused))
    return backend


def _short(gate: dict) -> str:
    from fsclip.runtime.gates import AGREEMENTS

    if gate["runtime"] == "onnx":
        worst = max(v for k in ("image_max_abs", "text_max_abs", "head_max_abs") if (v := gate[k]) is not None)
        return f"max abs difference {worst:.1e}"
    cosine = min(v for k in ("image_min_cosine", "text_min_cosine") if (v := gate[k]) is not None)
    return f"cosine >= {cosine:.4f}, {AGREEMENTS[gate['agreement']]} {100 * gate['top1_agreement']:.1f}%"


def _prepare(backend: Backend, runtime: str, calibration: Iterable | None) -> Backend:
    """The cached, gated runtime for `backend`: export, quantise and gate whatever the cache lacks."""
    from fsclip.runtime import cache
    from fsclip.runtime.export import ExportError
    from fsclip.runtime.gates import GateResult, calibration_pixels, run_gates
    from fsclip.runtime.ort_backend import OrtBackend

    folder = cache.entry_dir(backend, runtime)
    with cache.locked(folder):
        built = _ensure_models(backend, runtime, folder)
        if "error" in built:
            raise ExportError(built["error"])
        try:
            gate = GateResult.from_dict(cache.read_gates(folder)["gate"])
        except (TypeError, KeyError):  # no record, or a damaged one: gate (again)
            t0 = time.perf_counter()
            candidate = OrtBackend(backend, runtime, folder)
            pixels, source = calibration_pixels(backend, calibration)
            gate = run_gates(backend, candidate, runtime, pixels, source)
            cache.write_gates(folder, {"gate": gate.to_dict(), "seconds": round(time.perf_counter() - t0, 2)})
        if not gate.passed:
            raise RuntimeRefused(f"runtime {runtime} refused for {backend.spec}: {' and '.join(gate.failed())} "
                                 f"failed ({gate.figures()}) "
                                 f"(gated once and recorded in {folder}; use another --runtime)")
        return OrtBackend(backend, runtime, folder, gate.to_dict())


def export_models(backend: Backend, runtime: str) -> Path:
    """The cache folder holding `backend`'s towers for `runtime`, exported (and quantised) if needed.

    Not gated: for tools and benchmarks that measure a runtime themselves; models go through
    `apply_runtime`.
    """
    from fsclip.runtime import cache
    from fsclip.runtime.export import ExportError

    require_onnx(runtime)
    folder = cache.entry_dir(backend, runtime)
    with cache.locked(folder):
        built = _ensure_models(backend, runtime, folder)
    if "error" in built:
        raise ExportError(built["error"])
    return folder


def _ensure_models(backend: Backend, runtime: str, folder: Path) -> dict:
    """The entry's manifest, building the models first if they are missing or damaged."""
    from fsclip._io import atomic_dir
    from fsclip.runtime import cache
    from fsclip.runtime.export import ExportError, export_towers
    from fsclip.runtime.quantize import quantize

    found = cache.read_manifest(folder)
    if found is not None:
        return found
    if folder.exists():
        logger.warning("ONNX cache entry %s is incomplete or damaged; building it again", folder)
    with atomic_dir(folder, overwrite=True) as tmp:
        try:
            if runtime == "onnx":
                files = export_towers(backend, tmp)
            else:
                src = cache.entry_dir(backend, "onnx")
                with cache.locked(src):
                    fp32 = _ensure_models(backend, "onnx", src)
                    if "error" in fp32:
                        raise ExportError(fp32["error"])
                    for name in sorted(n for n in fp32["files"] if n.endswith(".onnx")):  # image (+ text)
                        try:
                            quantize(src / name, tmp / name)
                        except (OSError, MemoryError):
                            raise
                        except Exception as e:  # the quantiser's failures are the model's, like the exporter's
                            text = (str(e).strip().splitlines() or [type(e).__name__])[0]
                            raise ExportError(f"cannot quantise the {name.split('.')[0]} tower: {text}") from e
                files = sorted(p.name for p in tmp.iterdir() if p.is_file())
            data = cache.manifest(tmp, files)
        except ExportError as e:  # recorded, so the next run refuses at once instead of exporting again
            data = {"error": str(e)}
        cache.write_manifest(tmp, data)
    return data
