"""Tip-Adapter-F: Tip-Adapter with its cache keys fine-tuned by cross-entropy (Zhang et al., 2022).

The keys start as Tip-Adapter's (the average of augmented views of each training image) and are
trained for the paper's 20 epochs (AdamW, lr 1e-3, batch 256, cosine), each epoch on another cached
augmented view of every image, as the paper re-augments its training images every epoch. alpha and
beta are chosen by cross-validation on the training images before training, as in Tip-Adapter, and
kept: after training on all the images, held-out folds would no longer be held out. Nothing is chosen
on the validation images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fsclip.adapters._budget import Budget, Schedule
from fsclip.adapters._features import FeatureData
from fsclip.adapters._train import FeatureBatches, run_training
from fsclip.adapters.config import check_field
from fsclip.adapters.registry import register_adapter
from fsclip.adapters.tip_adapter import (
    TipAdapter,
    TipAdapterConfig,
    cache_keys,
    cache_logits,
    cross_validate_alpha_beta,
)
from fsclip.backends import Backend

__all__ = ["TipAdapterF", "TipAdapterFConfig"]

logger = logging.getLogger(__name__)
DEFAULT_EPOCHS = 20  # the paper's


@dataclass(frozen=True)
class TipAdapterFConfig(TipAdapterConfig):
    """Options of Tip-Adapter-F (besides Tip-Adapter's).

    Attributes:
        epochs: passes over the training images' (augmented) features; None: the paper's 20, cut to the
            compute budget.
        lr: AdamW learning rate for the keys (cosine decay).
        batch_size: features per step.
    """

    epochs: int | None = None
    lr: float = 1e-3
    batch_size: int = 256

    def __post_init__(self):
        super().__post_init__()
        check_field(self.epochs is None or (isinstance(self.epochs, int) and self.epochs >= 1), "epochs", self.epochs,
                    "an integer >= 1 or None")
        check_field(self.lr > 0, "lr", self.lr, "> 0")
        check_field(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")


class TipAdapterF(TipAdapter):
    """Tip-Adapter whose keys are trained; predicts exactly like Tip-Adapter."""

    name = "tip-adapter-f"
    config_class = TipAdapterFConfig
    views_share = 0.8  # of the budget left: the rest is for training

    @classmethod
    def fit_features(cls, backend: Backend, classes: Sequence[str], data: FeatureData, config: TipAdapterFConfig,
                     views: torch.Tensor | None = None, budget: Budget | None = None,
                     progress: bool = False) -> TipAdapterF:
        """`views`: (V, N, D) augmented features of the N training images (None: clean features only)."""
        budget = budget or Budget(float("inf"))
        n_cls = data.num_classes
        text = data.logit_scale * data.text
        labels = data.train_targets
        init = cache_keys(data.train, views)
        alpha, beta, how = cross_validate_alpha_beta(text, data.train, init, labels, config.alpha_grid,
                                                     config.beta_grid, config.folds, config.seed)
        # train with the chosen blend; alpha 0 (zero-shot won) would leave the keys without gradient
        train_alpha = alpha or 1.0
        keys = torch.nn.Parameter(init.clone())
        batches = FeatureBatches(views if views is not None and len(views) else data.train[None], labels,
                                 config.batch_size, config.seed)
        opt = torch.optim.AdamW([keys], lr=config.lr, eps=1e-4)

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(x @ text.T + train_alpha * cache_logits(x, keys, labels, beta, n_cls), y)

        schedule = Schedule(f"{cls.name} training", "step", default=DEFAULT_EPOCHS * len(batches),
                            fixed=config.epochs * len(batches) if config.epochs else None)
        result = run_training(params={"keys": keys}, optimizer=opt, batches=batches, loss_fn=loss_fn,
                              schedule=schedule, budget=budget, desc=cls.name, progress=progress)
        adapter = cls(backend, classes, config, text, keys.detach().clone(), labels.clone(), alpha, beta)
        adapter.selection = {"alpha": alpha, "beta": beta, **how, "training": result.schedule}
        return adapter

    @classmethod
    def fit(cls, backend, train, val, config: TipAdapterFConfig, progress: bool = False,
            budget: Budget | None = None) -> TipAdapterF:
        data = FeatureData.build(backend, train, config.templates, progress=progress)
        views, schedule = cls.encode_views(backend, train, config, budget, progress, share=cls.views_share)
        adapter = cls.fit_features(backend, train.classes, data, config, views, budget=budget, progress=progress)
        adapter.selection["views"] = schedule.to_dict()
        return adapter


register_adapter(TipAdapterF)
