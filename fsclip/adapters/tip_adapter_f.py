"""Tip-Adapter-F: Tip-Adapter with its cache keys fine-tuned by a few epochs of cross-entropy.

Training runs on cached features only: the clean training features plus `views` augmented views of
each image (random resized crop, flip), each encoded once and kept in the feature cache, as the paper
pre-computes its augmented cache. The keys of the epoch with the best validation score are kept, then
alpha and beta are searched again on validation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fsclip.adapters._features import FeatureData
from fsclip.adapters.config import check_field
from fsclip.adapters.registry import register_adapter
from fsclip.adapters.tip_adapter import (
    TipAdapter,
    TipAdapterConfig,
    cache_keys,
    cache_logits,
    search_alpha_beta,
)
from fsclip.backends import Backend

__all__ = ["TipAdapterF", "TipAdapterFConfig"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TipAdapterFConfig(TipAdapterConfig):
    """Options of Tip-Adapter-F (besides Tip-Adapter's).

    Attributes:
        epochs: passes over the (clean + augmented) training features.
        lr: AdamW learning rate for the keys (cosine decay).
        batch_size: features per step.
        views: augmented views per training image: they make the initial keys (as in Tip-Adapter) and
            are the training samples, with the clean features.
    """

    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 256
    views: int = 10

    def __post_init__(self):
        super().__post_init__()
        check_field(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        check_field(self.lr > 0, "lr", self.lr, "> 0")
        check_field(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")


def _score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    return float((logits.argmax(-1) == targets).float().mean()), -float(F.cross_entropy(logits, targets))


class TipAdapterF(TipAdapter):
    """Tip-Adapter whose keys are trained; predicts exactly like Tip-Adapter."""

    name = "tip-adapter-f"
    config_class = TipAdapterFConfig
    best_epoch: int | None = None  # the epoch whose keys were kept (0: the training-free ones)

    @classmethod
    def fit_features(cls, backend: Backend, classes: Sequence[str], data: FeatureData, config: TipAdapterFConfig,
                     views: torch.Tensor | None = None) -> TipAdapterF:
        """`views`: (V, N, D) augmented features of the N training images (None: clean features only)."""
        n_cls = data.num_classes
        text = data.logit_scale * data.text
        val_zs = data.val @ text.T  # (M, C)
        init = cache_keys(data.train, views)
        alpha, beta, _ = search_alpha_beta(val_zs, data.val, data.val_targets, init, data.train_targets,
                                           config.alpha_grid, config.beta_grid)
        # train with the training-free choice; alpha 0 would leave the keys without gradient
        alpha = alpha or 1.0
        x, y = data.train, data.train_targets
        if views is not None and len(views):
            x = torch.cat([x, views.reshape(-1, x.shape[1])])
            y = y.repeat(1 + len(views))
        keys = torch.nn.Parameter(init)
        steps_per_epoch = math.ceil(len(x) / config.batch_size)
        total = config.epochs * steps_per_epoch
        opt = torch.optim.AdamW([keys], lr=config.lr, eps=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        gen = torch.Generator().manual_seed(config.seed)

        def val_score() -> tuple[float, float]:
            with torch.no_grad():
                return _score(val_zs + alpha * cache_logits(data.val, keys, data.train_targets, beta, n_cls),
                              data.val_targets)

        best, best_keys, best_epoch = val_score(), keys.detach().clone(), 0
        for epoch in tqdm(range(1, config.epochs + 1), desc="tip-adapter-f", unit="epoch", disable=None, leave=False):
            for idx in torch.randperm(len(x), generator=gen).split(config.batch_size):
                logits = x[idx] @ text.T + alpha * cache_logits(x[idx], keys, data.train_targets, beta, n_cls)
                loss = F.cross_entropy(logits, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            score = val_score()
            if score > best:
                best, best_keys, best_epoch = score, keys.detach().clone(), epoch
        logger.info("tip-adapter-f: keys from epoch %d of %d (validation accuracy %.3f)", best_epoch,
                    config.epochs, best[0])
        alpha, beta, acc = search_alpha_beta(val_zs, data.val, data.val_targets, best_keys, data.train_targets,
                                             config.alpha_grid, config.beta_grid)
        logger.info("tip-adapter-f: alpha=%g beta=%g chosen on validation (accuracy %.3f)", alpha, beta, acc)
        adapter = cls(backend, classes, config, text, best_keys, data.train_targets.clone(), alpha, beta)
        adapter.best_epoch = best_epoch
        return adapter

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "best_epoch": self.best_epoch}

    @classmethod
    def from_state(cls, backend, classes, config, tensors, extra, base) -> TipAdapterF:
        adapter = super().from_state(backend, classes, config, tensors, extra, base)
        adapter.best_epoch = extra.get("best_epoch")
        return adapter


register_adapter(TipAdapterF)
