"""CLAP, the class-adaptive linear probe (Silva-Rodriguez et al., CVPR 2024).

A linear probe whose class prototypes w_c start as the zero-shot text embeddings t_c and stay close to
them through a per-class penalty, with no hyper-parameter search and no validation images:

    min_W  CE(s * f . w_c / |w_c|)  +  1/C * sum_c lambda_c * |w_c - t_c|^2

The penalty weights come from the paper's adaptation of the augmented-Lagrangian method, computed from
the support set alone: lambda_c is the zero-shot model's mean probability of class c on the images of
class c, so classes zero-shot already gets right are held close to their text prototype and the others
may move. They stay fixed while the prototypes are optimised (the reference implementation's CLAP
setting); `lagrangian_updates=True` runs the classic PHR multiplier update after every epoch instead.

As in the reference: features of 20 random augmented views of each training image (cached; cut to the
compute budget), SGD with momentum 0.9, batch 256, 300 epochs, one warm-up epoch at lr 1e-5, then
cosine decay from lr 0.1. The reference's prototypes are CLIP's unnormalised text embeddings (norm
about `REFERENCE_NORM`); fsclip's are unit-norm, so the learning rates are divided and the penalty
multiplied by that norm squared, which gives the same optimisation path (the logits depend only on
the prototypes' directions).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fsclip.adapters._budget import Budget, Schedule
from fsclip.adapters._costs import Costs
from fsclip.adapters._features import FeatureData, encode_views
from fsclip.adapters._frozen import FeatureAdapter
from fsclip.adapters._train import FeatureBatches, run_training
from fsclip.adapters.base import BaseModel
from fsclip.adapters.config import AdapterConfig, check_augmentation, check_counts, check_field
from fsclip.adapters.registry import register_adapter
from fsclip.backends import Backend
from fsclip.data import LabeledImages

__all__ = ["Clap", "ClapConfig", "zero_shot_multipliers"]

logger = logging.getLogger(__name__)

REFERENCE_NORM = 10.0  # typical norm of CLIP's unnormalised text embeddings, which the reference's rates are for
DEFAULT_VIEWS, DEFAULT_EPOCHS = 20, 300


@dataclass(frozen=True)
class ClapConfig(AdapterConfig):
    """Options of CLAP; the defaults are the paper's, and nothing is chosen on data.

    Attributes:
        views: augmented views per training image; None: the paper's 20, cut to the compute budget.
        epochs: passes over all views; None: the paper's 300, cut to the compute budget.
        lr: peak SGD learning rate, in the reference's scale (see the module docstring).
        batch_size: features per step.
        lagrangian_updates: update the penalty multipliers after every epoch (PHR augmented Lagrangian,
            capped at 1 / lr for a stable step) instead of keeping the zero-shot-derived ones.
        crop_scale: smallest area fraction of the random resized crop.
        flip: random horizontal flips in the views.
    """

    views: int | None = None
    epochs: int | None = None
    lr: float = 0.1
    batch_size: int = 256
    lagrangian_updates: bool = False
    crop_scale: float = 0.5
    flip: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_counts(self, "views", "epochs")
        check_field(self.lr > 0, "lr", self.lr, "> 0")
        check_field(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check_field(isinstance(self.lagrangian_updates, bool), "lagrangian_updates", self.lagrangian_updates,
                    "true or false")
        check_augmentation(self)


def zero_shot_multipliers(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) lambda_c: the mean zero-shot probability of class c over the support features of class c."""
    probs = logits.softmax(-1)  # (N, C)
    onehot = F.one_hot(targets, num_classes).float()  # (N, C)
    return (probs * onehot).sum(0) / onehot.sum(0).clamp_min(1)


class Clap(FeatureAdapter):
    """Class prototypes constrained to the zero-shot ones; predicts with their directions."""

    name = "clap"
    config_class = ClapConfig
    views_share = 0.8  # of the budget left, for encoding views: training on features is cheap

    @classmethod
    def default_seconds(cls, costs: Costs) -> float:
        return (1 + DEFAULT_VIEWS) * costs.images * costs.image_seconds

    def __init__(self, backend: Backend, classes: Sequence[str], config: ClapConfig, weight: torch.Tensor,
                 base: BaseModel | None = None):
        super().__init__(backend, classes, config, base)
        self.weight = weight  # (C, D) unit prototypes times the logit scale

    @classmethod
    def fit(cls, backend: Backend, train: LabeledImages, val: LabeledImages, config: ClapConfig,
            progress: bool = False, budget: Budget | None = None) -> Clap:
        budget = budget or Budget(float("inf"))
        data = FeatureData.build(backend, train, config.templates, progress=progress)
        views, schedule = encode_views(backend, train.paths, config.views or DEFAULT_VIEWS, config.crop_scale,
                                       config.flip, config.seed, progress=progress, budget=budget,
                                       fixed=config.views is not None, share=cls.views_share, what="clap views")
        adapter = cls.fit_features(backend, train.classes, data, config, views, budget=budget, progress=progress)
        adapter.selection["views"] = schedule.to_dict()
        return adapter

    @classmethod
    def fit_features(cls, backend: Backend, classes: Sequence[str], data: FeatureData, config: ClapConfig,
                     views: torch.Tensor | None = None, budget: Budget | None = None,
                     progress: bool = False) -> Clap:
        """`views`: (V, N, D) augmented features of the N training images (None: the clean features)."""
        budget = budget or Budget(float("inf"))
        views = views if views is not None and len(views) else data.train[None]
        n_cls, scale, text = data.num_classes, data.logit_scale, data.text
        targets = data.train_targets
        pooled = views.reshape(-1, views.shape[-1])  # (V * N, D)
        multipliers = zero_shot_multipliers(scale * pooled @ text.T, targets.repeat(len(views)), n_cls)
        state = {"lambda": multipliers.clone(), "rho": torch.zeros(n_cls)}
        prototypes = torch.nn.Parameter(text.clone())
        r2 = REFERENCE_NORM**2

        def distance() -> torch.Tensor:  # (C,) squared distance to the zero-shot prototypes, reference scale
            return r2 * (prototypes - text).pow(2).sum(-1)

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = scale * x @ F.normalize(prototypes, dim=-1).T  # (B, D) @ (D, C) -> (B, C)
            return F.cross_entropy(logits, y) + (state["lambda"] * distance()).mean()

        def outer_step(epoch: int) -> None:  # PHR: lambda <- max(0, lambda + rho * h), rho <- h
            if epoch == 0:
                return
            with torch.no_grad():
                h = distance()
                # capped where an SGD step on the penalty would overshoot (weight * lr > 1): uncapped,
                # the multipliers grow every epoch until the prototypes diverge
                state["lambda"] = (state["lambda"] + state["rho"] * h).clamp(0.0, 1.0 / config.lr)
                state["rho"] = h

        batches = FeatureBatches(views, targets, config.batch_size, config.seed, pool_views=True)
        epoch_steps = len(batches)
        schedule = Schedule("clap training", "step", default=DEFAULT_EPOCHS * epoch_steps,
                            fixed=config.epochs * epoch_steps if config.epochs else None)
        opt = torch.optim.SGD([prototypes], lr=config.lr / r2, momentum=0.9)
        result = run_training(params={"prototypes": prototypes}, optimizer=opt, batches=batches, loss_fn=loss_fn,
                              schedule=schedule, budget=budget, warmup=epoch_steps, warmup_lr=1e-5 / r2,
                              on_epoch=outer_step if config.lagrangian_updates else None, desc="clap",
                              progress=progress)
        weight = scale * F.normalize(prototypes.detach(), dim=-1)
        adapter = cls(backend, classes, config, weight)
        adapter.selection = {"chosen by": "the paper's defaults, nothing searched; penalty weights from the "
                                          "zero-shot probabilities of the training images",
                             "penalty weights": [round(float(v), 4) for v in multipliers],
                             "training": result.schedule}
        return adapter

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.weight) @ self.weight.T  # (N, D) @ (D, C) -> (N, C)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    def extra_state(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_state(cls, backend, classes, config, tensors, extra, base) -> Clap:
        return cls(backend, classes, config, tensors["weight"], base)


register_adapter(Clap)
