"""Configuration shared by the adapters: frozen dataclasses validated on construction.

Each method's config subclasses `AdapterConfig` (or `TrainingConfig` when it trains with an optimiser);
change one with `dataclasses.replace`, which validates again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fsclip.adapters._budget import Schedule
from fsclip.errors import UsageError

__all__ = ["AdapterConfig", "TrainingConfig", "check_field"]


def check_field(ok: bool, field: str, value: Any, expected: str) -> None:
    """Raise the one-line error every config uses: `lr must be > 0, got -1.0`."""
    if not ok:
        raise UsageError(f"{field} must be {expected}, got {value!r}")


def check_counts(config, *names: str) -> None:
    """Each of `names` is None (the method's default) or an integer >= 1."""
    for name in names:
        value = getattr(config, name)
        check_field(value is None or (isinstance(value, int) and value >= 1), name, value, "an integer >= 1 or None")


def check_augmentation(config) -> None:
    """The random-resized-crop scale and flip flag every augmenting method has."""
    check_field(0.05 <= config.crop_scale <= 1.0, "crop_scale", config.crop_scale, "in [0.05, 1]")
    check_field(isinstance(config.flip, bool), "flip", config.flip, "true or false")


@dataclass(frozen=True)
class AdapterConfig:
    """Options every adapter has.

    Attributes:
        templates: prompt templates for the class-name text classifier (zero-shot prior): a shipped set
            name, a JSON file, or a sequence of strings with `{}`.
        calibrate: fit a temperature on the validation split so that probabilities are calibrated.
        seed: seeds weight initialisation, augmentation and batch order.
    """

    templates: str | tuple[str, ...] = "imagenet80"
    calibrate: bool = True
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.templates, list):
            object.__setattr__(self, "templates", tuple(self.templates))
        check_field(isinstance(self.templates, (str, tuple)) and len(self.templates) > 0, "templates",
                    self.templates, "a template set name, a JSON file or a non-empty list of templates")
        check_field(isinstance(self.calibrate, bool), "calibrate", self.calibrate, "true or false")
        check_field(isinstance(self.seed, int) and self.seed >= 0, "seed", self.seed, "an integer >= 0")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdapterConfig:
        unknown = sorted(set(values) - set(cls.fields()))
        if unknown:
            raise UsageError(f"unknown option(s) {', '.join(unknown)}; {cls.__name__} has: {', '.join(cls.fields())}")
        return cls(**values)

    def with_options(self, **overrides: Any) -> AdapterConfig:
        """`dataclasses.replace` with a one-line error naming the valid options."""
        unknown = sorted(set(overrides) - set(self.fields()))
        if unknown:
            raise UsageError(
                f"unknown option(s) {', '.join(unknown)} for {type(self).__name__}; choose from: "
                f"{', '.join(self.fields())}"
            )
        return dataclasses.replace(self, **overrides)


@dataclass(frozen=True)
class TrainingConfig(AdapterConfig):
    """Options of adapters trained with an optimiser on images (LoRA, fine-tuning).

    Attributes:
        lr: peak learning rate (AdamW, cosine decay).
        weight_decay: AdamW weight decay.
        batch_size: images per optimisation step.
        epochs: passes over the training images; exclusive with `iters`.
        iters: optimisation steps. When neither is set, the method's default schedule runs, cut to
            what fits the compute budget; either one set wins over the budget.
        eval_every: steps between validation checks (0: ten checks over the run).
        patience: stop after this many checks without a better validation score (0: never stop early).
        keep_best: end with the weights of the best validation check (else those of the last step).
            Validation checks run only with `keep_best` or `patience`: they spend the validation
            images on choosing a step, and the accuracy reported on them is then optimistic.
        val_curve: also check the validation images along the way (`eval_every`) only to report the
            accuracy curve (`training.history` in the metrics; `fit --compare-scratch`); nothing is
            chosen on it.
        crop_scale: smallest area fraction of the random resized crop (1.0 disables cropping).
        flip: random horizontal flips (turn off where mirror images mean something else).
    """

    lr: float = 2e-4
    weight_decay: float = 1e-2
    batch_size: int = 32
    epochs: int | None = None
    iters: int | None = None
    eval_every: int = 0
    patience: int = 0
    keep_best: bool = False
    val_curve: bool = False
    crop_scale: float = 0.5
    flip: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_field(self.lr > 0, "lr", self.lr, "> 0")
        check_field(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        check_field(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check_counts(self, "epochs", "iters")
        if self.epochs is not None and self.iters is not None:
            raise UsageError(f"give epochs or iters, not both (epochs={self.epochs}, iters={self.iters})")
        check_field(isinstance(self.eval_every, int) and self.eval_every >= 0, "eval_every", self.eval_every, ">= 0")
        check_field(isinstance(self.patience, int) and self.patience >= 0, "patience", self.patience, ">= 0")
        check_field(isinstance(self.keep_best, bool), "keep_best", self.keep_best, "true or false")
        check_field(isinstance(self.val_curve, bool), "val_curve", self.val_curve, "true or false")
        check_augmentation(self)

    @property
    def validates(self) -> bool:
        """Whether training checks the validation images (early stopping or keeping the best step)."""
        return self.keep_best or self.patience > 0

    def with_options(self, **overrides: Any) -> TrainingConfig:
        """As `AdapterConfig.with_options`; `epochs` and `iters` replace each other (both give the length)."""
        if overrides.get("iters") is not None and "epochs" not in overrides:
            overrides["epochs"] = None
        if overrides.get("epochs") is not None and "iters" not in overrides:
            overrides["iters"] = None
        return super().with_options(**overrides)

    def schedule(self, what: str, steps_per_epoch: int, default: int) -> Schedule:
        """Training steps: `iters`, else `epochs` passes, else the method's `default`, cut by the budget."""
        fixed = self.iters if self.iters is not None else (
            self.epochs * steps_per_epoch if self.epochs is not None else None)
        return Schedule(what, "step", default=default, fixed=fixed)
