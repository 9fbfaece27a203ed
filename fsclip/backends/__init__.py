"""Model backends: one module per library, one `Backend` interface, one `load_model` entry point."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable

import torch

from fsclip.backends import hf as _hf  # noqa: F401  (registers)
from fsclip.backends import hf_vision as _hf_vision  # noqa: F401  (registers)
from fsclip.backends import openclip as _openclip  # noqa: F401  (registers)
from fsclip.backends import timm as _timm  # noqa: F401  (registers)
from fsclip.backends._hub import offline_unless_reachable
from fsclip.backends.base import Backend
from fsclip.backends.registry import get_backend, list_backends, resolve_spec
from fsclip.distributed import world
from fsclip.errors import ModelLoadError, UsageError

__all__ = ["Backend", "list_backends", "load_model", "resolve_device", "resolve_dtype"]

logger = logging.getLogger(__name__)
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` asks Accelerate for the best local device (cuda, mps, else cpu); under torchrun /
    accelerate launch, `auto` and `cuda` are this rank's device (`cuda:LOCAL_RANK`, or cpu)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto" or (device == "cuda" and world.launched()):
        return world.device()
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {device!r} requested but MPS is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/`auto`: fp16 on CUDA, fp32 elsewhere (bf16 autocast is ~8x slower on AVX2 CPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of: auto, fp32, fp16, bf16") from None


def load_model(spec: str, device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
               runtime: str = "torch", calibration: Iterable | None = None) -> Backend:
    """Load a model from a spec (see `fsclip.backends.registry` for the syntax).

    Args:
        spec: model spec.
        device: `auto`, `cpu`, `cuda[:N]`, `mps` or a `torch.device`.
        dtype: weights/compute dtype; `None`/`auto` picks one for the device.
        runtime: what runs the towers: `torch`, `onnx` (ONNX Runtime fp32), `onnx-int8`, or `auto`
            (the fastest gated one on a CPU, torch elsewhere). See `fsclip.runtime`.
        calibration: images to gate an ONNX runtime on the first time it is used (files, folders,
            PIL images); shapes-world renders otherwise.
    """
    from fsclip.runtime import ORT_RUNTIMES, apply_runtime, check_runtime, require_onnx

    check_runtime(runtime)
    if runtime in ORT_RUNTIMES:
        require_onnx(runtime)  # before the (slow) load
        if device == "auto":
            device = "cpu"  # ONNX Runtime runs its CPU build here
    resolved = resolve_spec(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if runtime in ORT_RUNTIMES and (dev.type != "cpu" or dt != torch.float32):
        raise UsageError(f"runtime {runtime} runs fp32 on the CPU, not {dev} {str(dt).removeprefix('torch.')}; "
                         "use --device cpu --dtype fp32, or --runtime torch")
    cls = get_backend(resolved.backend)
    logger.info("loading %s via %s on %s (%s)", spec, resolved.backend, dev, dt)
    local = os.path.isdir(resolved.target.removeprefix("local-dir:"))
    try:
        with contextlib.nullcontext(False) if local else offline_unless_reachable() as offline:
            backend = cls.load(spec, resolved.target, resolved.pretrained, dev, dt)
    except ModelLoadError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelLoadError(_load_failure(spec, resolved.target, e, offline)) from e
    return apply_runtime(backend, runtime, calibration)


def _load_failure(spec: str, target: str, err: Exception, offline: bool) -> str:
    from huggingface_hub import constants

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if offline and not os.path.isdir(target.removeprefix("local-dir:")):
        return (
            f"cannot load model {spec!r}: its weights are not in the local cache ({constants.HF_HUB_CACHE}) "
            "and the hub is unreachable; download it on a connected machine, or pass a local folder "
            "(--model /path/to/folder with open_clip_config.json, or config.json as transformers or "
            "timm's save_for_hf write it)"
        )
    return f"cannot load model {spec!r} ({target}): {text}"
