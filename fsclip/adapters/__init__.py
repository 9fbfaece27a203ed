"""Few-shot adaptation: one module per method behind one registry and one contract.

    >>> from fsclip.adapters import fit, load_adapter
    >>> adapter = fit(load_model("shapes"), load_image_folder("train/"), method="tip-adapter")
    >>> adapter.predict_proba(["img.png"])        # (1, C) calibrated probabilities
    >>> adapter.save("my-adapter/"); load_adapter("my-adapter/")

Methods (`list_adapters()`): linear-probe, tip-adapter, tip-adapter-f (frozen features, cached on
disk), lora, partial-ft, full-ft (train the image tower, or both towers for LoRA); `auto` asks the
strategy advisor. Every fit ends the same way: a temperature calibrated on the validation split, and
validation accuracy of zero-shot vs the adapter recorded in `adapter.metrics` (and `metrics.json`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from fsclip.adapters import full_ft as _full_ft  # noqa: F401  (registers)
from fsclip.adapters import linear_probe as _linear_probe  # noqa: F401  (registers)
from fsclip.adapters import lora as _lora  # noqa: F401  (registers)
from fsclip.adapters import partial_ft as _partial_ft  # noqa: F401  (registers)
from fsclip.adapters import tip_adapter as _tip_adapter  # noqa: F401  (registers)
from fsclip.adapters import tip_adapter_f as _tip_adapter_f  # noqa: F401  (registers)
from fsclip.adapters._calibration import expected_calibration_error, fit_temperature
from fsclip.adapters._data import check_pair, check_trainable, holdout_split
from fsclip.adapters._features import encode_items
from fsclip.adapters.advisor import Advice, AdvisorConfig, advise
from fsclip.adapters.base import CONFIG_FILE, Adapter, read_header
from fsclip.adapters.config import AdapterConfig
from fsclip.adapters.registry import AUTO, get_adapter, list_adapters, list_methods, register_adapter
from fsclip.backends import Backend
from fsclip.data import LabeledImages
from fsclip.errors import AdapterError, UsageError
from fsclip.prompts_io import load_templates
from fsclip.zeroshot import build_text_classifier

__all__ = [
    "AUTO",
    "Adapter",
    "AdapterConfig",
    "Advice",
    "AdvisorConfig",
    "advise",
    "fit",
    "get_adapter",
    "holdout_split",
    "list_adapters",
    "list_methods",
    "load_adapter",
    "register_adapter",
]

logger = logging.getLogger(__name__)


def _config(cls: type[Adapter], config: AdapterConfig | None, overrides: dict[str, Any], lenient: bool) -> AdapterConfig:
    if config is not None and not isinstance(config, cls.config_class):
        raise UsageError(f"config is a {type(config).__name__}; method {cls.name!r} takes a "
                         f"{cls.config_class.__name__}")
    config = config or cls.config_class()
    if lenient:  # the advisor chose the method: options it does not have cannot apply
        dropped = sorted(k for k in overrides if k not in config.fields())
        if dropped:
            logger.warning("method %s has no option(s) %s; ignored", cls.name, ", ".join(dropped))
        overrides = {k: v for k, v in overrides.items() if k in config.fields()}
    return config.with_options(**overrides) if overrides else config


def fit(
    backend: Backend,
    train: LabeledImages,
    method: str = AUTO,
    val: LabeledImages | None = None,
    config: AdapterConfig | None = None,
    *,
    advisor: AdvisorConfig | None = None,
    progress: bool = False,
    **overrides: Any,
) -> Adapter:
    """Fit a few-shot adapter; `backend` itself is never modified.

    Args:
        backend: the base model (`fsclip.backends.load_model(spec)`).
        train: labelled training images.
        method: one of `list_methods()`; `auto` lets the strategy advisor choose (see `adapter.metrics`).
        val: validation images with the same classes; default: a stratified split of `train`
            (min(k, 4) per class, see `holdout_split`).
        config: the method's config dataclass; default: its defaults.
        advisor: thresholds of the strategy matrix for `auto`.
        progress: progress bars on stderr.
        **overrides: config fields to change, e.g. `iters=200, lr=1e-4`.
    """
    check_trainable(train)
    if val is None:
        train, val = holdout_split(train, seed=overrides.get("seed", config.seed if config else 0))
    check_pair(train, val)
    advice = None
    if method == AUTO:
        if config is not None:
            raise UsageError("method 'auto' chooses the config too; pass options as keyword overrides instead")
        advice = advise(backend, train, val, overrides.get("templates", "imagenet80"), advisor, progress=progress)
        method = advice.method
    cls = get_adapter(method)
    cfg = _config(cls, config, overrides, lenient=advice is not None)
    start = time.perf_counter()
    devices = [backend.device] if backend.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # seeded without disturbing the caller's RNG
        torch.manual_seed(cfg.seed)
        adapter = cls.fit(backend, train, val, cfg, progress=progress)
    _evaluate(adapter, backend, train, val, advice, time.perf_counter() - start)
    return adapter


@torch.no_grad()
def _evaluate(adapter: Adapter, backend: Backend, train: LabeledImages, val: LabeledImages, advice: Advice | None,
              seconds: float) -> None:
    """Calibrate on validation and record zero-shot vs adapter accuracy there."""
    y = torch.tensor(val.targets, dtype=torch.long)
    text = build_text_classifier(backend, train.classes, load_templates(adapter.config.templates)).float().cpu()
    zs = backend.logit_scale * encode_items(backend, val.paths, what="validation image") @ text.T
    logits = adapter.logits_from_features(adapter.encode(val.paths)).float().cpu()
    temperature = fit_temperature(logits, y) if adapter.config.calibrate else 1.0
    adapter.temperature = temperature
    acc = {"zero_shot": float((zs.argmax(-1) == y).float().mean()), "adapter": float((logits.argmax(-1) == y).float().mean())}
    adapter.metrics = {
        "method": adapter.name,
        "val_accuracy": acc,
        "val_ece": {"uncalibrated": expected_calibration_error(logits.softmax(-1), y),
                    "calibrated": expected_calibration_error((logits / temperature).softmax(-1), y)},
        "temperature": temperature,
        "train_images": len(train),
        "val_images": len(val),
        "images_per_class": {"min": min(train.counts().values()), "max": max(train.counts().values())},
        "fit_seconds": round(seconds, 2),
        "advice": advice.to_dict() if advice else None,
    }
    logger.info("validation accuracy: zero-shot %.3f, %s %.3f", acc["zero_shot"], adapter.name, acc["adapter"])


def load_adapter(path: str | os.PathLike, backend: Backend | None = None, device: str | torch.device = "auto",
                 dtype: str | torch.dtype | None = None) -> Adapter:
    """Load an adapter folder; without `backend`, its base model is loaded from the spec it recorded, on
    `device` in `dtype` (default: the device's, e.g. fp16 on CUDA, whatever the adapter was fitted in).

    Raises:
        AdapterError: not an adapter folder, a damaged one (naming the file and what is wrong), or
            `backend` is not the model the adapter was fitted on.
    """
    from fsclip.backends import load_model

    header = read_header(path)
    try:
        cls = get_adapter(header["method"])
    except UsageError as e:
        raise AdapterError(f"{os.path.join(path, CONFIG_FILE)}: {e}") from None
    if backend is None:  # the fingerprint does not depend on the dtype: load in the device's default
        backend = load_model(header["base_model"]["spec"], device=device, dtype=dtype)
    return cls.load(path, backend)
