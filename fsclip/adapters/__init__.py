"""Few-shot adaptation: one module per method behind one registry and one contract.

    >>> from fsclip.adapters import fit, load_adapter
    >>> adapter = fit(load_model("shapes"), load_image_folder("train/"), method="clap", budget="2m")
    >>> adapter.predict_proba(["img.png"])        # (1, C) calibrated probabilities
    >>> adapter.save("my-adapter/"); load_adapter("my-adapter/")

Methods (`list_adapters()`): on frozen, cached features clap, coop, linear-probe, tip-adapter and
tip-adapter-f; prolip (the image projection), lora, partial-ft and full-ft train part of the towers;
`auto` asks the strategy advisor. Every fit runs within a compute budget (`budget=`, default per
device) that sizes the schedules, and ends the same way: the validation images, which no method
chooses anything on, give the reported accuracy of zero-shot vs the adapter and a temperature for
calibrated probabilities (its effect on calibration error cross-fitted); all of it in
`adapter.metrics` (and `metrics.json`), with which data each figure came from.

Under `torchrun` / `accelerate launch` a fit is data-parallel (see `fsclip.distributed.world`): the
images are encoded in parts by the ranks, training runs on the global batch split between them, and
every rank returns the same adapter; save it from the main process.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from fsclip.adapters import clap as _clap  # noqa: F401  (registers)
from fsclip.adapters import coop as _coop  # noqa: F401  (registers)
from fsclip.adapters import full_ft as _full_ft  # noqa: F401  (registers)
from fsclip.adapters import linear_probe as _linear_probe  # noqa: F401  (registers)
from fsclip.adapters import lora as _lora  # noqa: F401  (registers)
from fsclip.adapters import partial_ft as _partial_ft  # noqa: F401  (registers)
from fsclip.adapters import prolip as _prolip  # noqa: F401  (registers)
from fsclip.adapters import prototype as _prototype  # noqa: F401  (registers)
from fsclip.adapters import scratch as _scratch  # noqa: F401  (registers)
from fsclip.adapters import tip_adapter as _tip_adapter  # noqa: F401  (registers)
from fsclip.adapters import tip_adapter_f as _tip_adapter_f  # noqa: F401  (registers)
from fsclip.adapters._budget import (
    DEFAULT_BUDGETS,
    Budget,
    format_seconds,
    parse_duration,
    plan_log,
    resolve_budget,
)
from fsclip.adapters._calibration import expected_calibration_error, fit_temperature
from fsclip.adapters._compare import SHARED_OPTIONS, compare
from fsclip.adapters._costs import measure_costs
from fsclip.adapters._data import check_pair, check_trainable, holdout_split
from fsclip.adapters._features import encode_items
from fsclip.adapters.advisor import Advice, AdvisorConfig, advise
from fsclip.adapters.base import CONFIG_FILE, Adapter, read_header
from fsclip.adapters.config import AdapterConfig
from fsclip.adapters.registry import AUTO, get_adapter, list_adapters, list_methods, register_adapter
from fsclip.backends import Backend
from fsclip.data import LabeledImages
from fsclip.distributed import world
from fsclip.errors import AdapterError, UsageError
from fsclip.prompts_io import load_templates
from fsclip.zeroshot import build_text_classifier

__all__ = [
    "AUTO",
    "Adapter",
    "AdapterConfig",
    "Advice",
    "AdvisorConfig",
    "Budget",
    "DEFAULT_BUDGETS",
    "advise",
    "fit",
    "get_adapter",
    "holdout_split",
    "list_adapters",
    "list_methods",
    "load_adapter",
    "parse_duration",
    "register_adapter",
    "runnable_methods",
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


def runnable_methods(backend: Backend) -> list[str]:
    """The registered methods that can run on `backend` with their default config (e.g. no text tower)."""
    return [m for m in list_adapters() if get_adapter(m).unsupported(backend) is None]


def _check_text(cls: type[Adapter], config: AdapterConfig, backend: Backend) -> None:
    if cls.needs_text(config) and not getattr(backend, "has_text", True):
        raise AdapterError(f"method {cls.name} needs a text tower (class-name prompts), and {backend.spec!r} has "
                           f"none; methods for image-only models: {', '.join(runnable_methods(backend))}")


def _check_data_parallel(cls: type[Adapter], config: AdapterConfig, backend: Backend, compare_scratch: bool) -> None:
    """Under a launcher, refuse to train batch-norm statistics: each rank would estimate them on its own
    part of the batch (torch's SyncBatchNorm, which would share them, is GPU-only)."""
    if world.size() > 1 and (getattr(config, "batch_norm", None) == "train" or compare_scratch) \
            and _has_batch_norm(backend):
        what = "--compare-scratch" if compare_scratch else f"{cls.name} with batch_norm=train"
        raise UsageError(f"{what} trains the batch-norm statistics of {backend.spec!r}, which data-parallel ranks "
                         "cannot share; run it in one process")


def fit(
    backend: Backend,
    train: LabeledImages,
    method: str = AUTO,
    val: LabeledImages | None = None,
    config: AdapterConfig | None = None,
    *,
    budget: Budget | str | float | None = None,
    advisor: AdvisorConfig | None = None,
    progress: bool = False,
    compare_scratch: bool = False,
    **overrides: Any,
) -> Adapter:
    """Fit a few-shot adapter within a compute budget; `backend` itself is never modified.

    Args:
        backend: the base model (`fsclip.backends.load_model(spec)`).
        train: labelled training images.
        method: one of `list_methods()`; `auto` lets the strategy advisor choose (see `adapter.metrics`).
        val: validation images with the same classes, used only to report accuracy and calibrate
            (and for early stopping where a config asks for it); default: a stratified split of
            `train` (min(k, 4) per class, see `holdout_split`).
        config: the method's config dataclass; default: its defaults.
        budget: wall-clock budget for the whole fit, e.g. "5m", "2h", 90 (seconds), "none" (no limit);
            default: `DEFAULT_BUDGETS` for the model's device. Schedules are cut to fit it; explicit
            `iters` / `epochs` / `views` win over it.
        advisor: thresholds of the strategy matrix for `auto`.
        progress: progress bars on stderr (periodic log lines on `PLAN_LOGGER` when not a terminal).
        compare_scratch: afterwards, train the same architecture from random initialisation (`scratch`)
            on the same images with the same augmentation, seed and budget, and report both validation
            accuracies and curves in `adapter.metrics["scratch_comparison"]` (the playbook's "transfer
            or scratch?" test); the fit then takes up to twice the budget.
        **overrides: config fields to change, e.g. `iters=200, lr=1e-4`; an unknown one is an error.

    Raises:
        UsageError: unknown method or option, a bad value, a bad budget.
        AdapterError: the method cannot run on this model (e.g. CoOp without a text tower).
    """
    budget = resolve_budget(budget, backend.device)
    check_trainable(train)
    if val is None:
        train, val = holdout_split(train, seed=overrides.get("seed", config.seed if config else 0))
    check_pair(train, val)
    plan_log.info("fit: %s on %d training images of %d classes (%d validation images); budget %s on %s",
                  method, len(train), len(train.classes), len(val), budget.describe(), backend.device)
    advice = None
    if method != AUTO:  # a method that cannot run on this model fails before anything is measured
        cls = get_adapter(method)
        cfg = _config(cls, config, overrides, lenient=False)
        _check_text(cls, cfg, backend)
        _check_data_parallel(cls, cfg, backend, compare_scratch)
    costs = measure_costs(backend, train, budget) if budget.limited or method == AUTO else None
    if method == AUTO:
        if config is not None:
            raise UsageError("method 'auto' chooses the config too; pass options as keyword overrides instead")
        advice = world.broadcast(advise(backend, train, overrides.get("templates", "imagenet80"), advisor,
                                        budget=budget, progress=progress, options=overrides, costs=costs))
        method = advice.method
        overrides = {**overrides, **advice.options}
        cls = get_adapter(method)
        cfg = _config(cls, config, overrides, lenient=True)
        _check_text(cls, cfg, backend)
        _check_data_parallel(cls, cfg, backend, compare_scratch)
    if compare_scratch and "val_curve" in cfg.fields():
        cfg = cfg.with_options(val_curve=True)
    # the base model's validation features (for the zero-shot comparison) now: cached, their cost is
    # counted before any schedule is planned, and frozen-feature adapters read them from the cache later
    encode_items(backend, val.paths, progress=progress, what="validation image")
    if costs is not None:  # what follows training (re-encoding the validation images, ...) is kept out of it
        prompts = len(train.classes) * len(load_templates(cfg.templates))
        budget.reserve = max(budget.reserve, cls.finish_seconds(costs, len(val), prompts))
    devices = [backend.device] if backend.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # seeded without disturbing the caller's RNG
        torch.manual_seed(cfg.seed)
        adapter = cls.fit(backend, train, val, cfg, progress=progress, budget=budget)
    fitted = budget.elapsed()
    _evaluate(adapter, backend, train, val, advice, fitted)
    adapter.metrics["budget"] = {"seconds": None if not budget.limited else budget.seconds,
                                 "fit_seconds": round(fitted, 2), "total_seconds": round(budget.elapsed(), 2)}
    plan_log.info("fit done in %s (budget %s)", format_seconds(budget.elapsed()), budget.describe())
    if compare_scratch:
        plan_log.info("compare with scratch: the same architecture from random initialisation, same images, "
                      "augmentation, seed and budget (%s)", budget.describe())
        shared = {k: v for k, v in {**overrides, "seed": cfg.seed}.items() if k in SHARED_OPTIONS}
        scratch = fit(backend, train, "scratch", val=val, budget=budget.seconds, progress=progress, val_curve=True,
                      **shared)
        adapter.metrics["scratch_comparison"] = compare(adapter, scratch)
    return adapter


def _has_batch_norm(backend: Backend) -> bool:
    model = getattr(backend, "model", None)
    return isinstance(model, torch.nn.Module) and any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _crossfit_ece(logits: torch.Tensor, y: torch.Tensor) -> float | None:
    """ECE of temperature-scaled probabilities where each half's temperature is fitted on the other half.

    A temperature fitted and scored on the same few images looks better than it is; cross-fitting
    scores every image with a temperature that never saw it. None with fewer than 4 images.
    """
    if len(y) < 4:
        return None
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    halves = order.chunk(2)
    probs = torch.empty_like(logits)
    for fit_on, score_on in ((halves[0], halves[1]), (halves[1], halves[0])):
        t = fit_temperature(logits[fit_on], y[fit_on])
        probs[score_on] = (logits[score_on] / t).softmax(-1)
    return expected_calibration_error(probs, y)


@torch.no_grad()
def _evaluate(adapter: Adapter, backend: Backend, train: LabeledImages, val: LabeledImages, advice: Advice | None,
              seconds: float) -> None:
    """Report zero-shot vs adapter accuracy on the validation images, and calibrate there."""
    y = torch.tensor(val.targets, dtype=torch.long)
    logits = adapter.logits_from_features(adapter.encode(val.paths)).float().cpu()
    if not torch.isfinite(logits).all():
        lr = getattr(adapter.config, "lr", None)
        raise AdapterError(f"{adapter.name} diverged: its outputs are not finite"
                           + (f"; try a lower learning rate than lr={lr:g}" if lr is not None else ""))
    acc = {"adapter": float((logits.argmax(-1) == y).float().mean())}
    if getattr(backend, "has_text", True):
        text = build_text_classifier(backend, train.classes, load_templates(adapter.config.templates)).float().cpu()
        zs = backend.logit_scale * encode_items(backend, val.paths, what="validation image") @ text.T
        acc = {"zero_shot": float((zs.argmax(-1) == y).float().mean()), **acc}
    temperature = fit_temperature(logits, y) if adapter.config.calibrate else 1.0
    adapter.temperature = temperature
    uses = ["reported accuracy", "temperature (calibration)", *adapter.validation_uses]
    adapter.metrics = {
        "method": adapter.name,
        "val_accuracy": acc,
        "val_ece": {"uncalibrated": expected_calibration_error(logits.softmax(-1), y),
                    "calibrated": expected_calibration_error((logits / temperature).softmax(-1), y),
                    "calibrated_cross_fitted": _crossfit_ece(logits, y) if adapter.config.calibrate else None},
        "temperature": temperature,
        "train_images": len(train),
        "val_images": len(val),
        "images_per_class": {"min": min(train.counts().values()), "max": max(train.counts().values())},
        "fit_seconds": round(seconds, 2),
        "selection": adapter.selection,
        "data_roles": {
            "training images": "fitting; any choice the method makes (cross-validation on them) and the "
                               "advisor's measurements",
            "validation images": ", ".join(uses),
        },
        "val_accuracy_is_held_out": not adapter.validation_uses,
        "advice": advice.to_dict() if advice else None,
    }
    logger.info("validation accuracy: %s", ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))


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
