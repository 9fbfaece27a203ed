"""Tip-Adapter (Zhang et al., 2022): a training-free key/value cache of few-shot features.

    logits = s * f W_text^T + alpha * exp(-beta * (1 - f K^T)) L

with K the training features (keys), L their one-hot labels (values), s the model's logit scale.
alpha (how much to trust the cache) and beta (how sharp the affinity is) are searched on validation;
alpha = 0 is plain zero-shot and always a candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fsclip.adapters._features import FeatureData, encode_views
from fsclip.adapters._frozen import FeatureAdapter
from fsclip.adapters.base import BaseModel
from fsclip.adapters.config import AdapterConfig, check_field
from fsclip.adapters.registry import register_adapter
from fsclip.backends import Backend
from fsclip.data import LabeledImages

__all__ = ["TipAdapter", "TipAdapterConfig", "cache_keys", "cache_logits", "search_alpha_beta"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TipAdapterConfig(AdapterConfig):
    """Options of Tip-Adapter.

    Attributes:
        alpha_grid: cache weights tried on validation (in logits; the paper's values for a logit scale of 100).
        beta_grid: affinity sharpness values tried on validation.
        views: augmented views (random resized crop, flip) per training image whose features, averaged
            with the clean one, make the cache keys, as the paper builds its cache; 0: clean features only.
            Views are encoded once and cached.
        crop_scale: smallest area fraction of the random resized crop.
        flip: random horizontal flips in the views.
    """

    alpha_grid: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0)
    beta_grid: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0, 5.5, 7.0, 9.0, 12.0, 16.0, 20.0, 25.0)
    views: int = 0
    crop_scale: float = 0.5
    flip: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("alpha_grid", "beta_grid"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
                value = tuple(value)
            check_field(len(value) > 0 and all(v >= 0 for v in value), name, value, "a non-empty list of values >= 0")
        check_field(isinstance(self.views, int) and self.views >= 0, "views", self.views, "an integer >= 0")
        check_field(0.05 <= self.crop_scale <= 1.0, "crop_scale", self.crop_scale, "in [0.05, 1]")
        check_field(isinstance(self.flip, bool), "flip", self.flip, "true or false")


def cache_keys(features: torch.Tensor, views: torch.Tensor | None) -> torch.Tensor:
    """(N, D) keys: each training image's clean feature averaged with its (V, N, D) views, renormalised."""
    if views is None or not len(views):
        return features.clone()
    return torch.nn.functional.normalize(torch.cat([features[None], views]).mean(0), dim=-1)


def cache_logits(features: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, beta: float,
                 num_classes: int) -> torch.Tensor:
    """(N, D) features, (K, D) keys, (K,) labels -> (N, C) summed affinities per class."""
    affinity = torch.exp(-beta * (1.0 - features @ keys.T))  # (N, D) @ (D, K) -> (N, K)
    return affinity.new_zeros(len(features), num_classes).index_add_(1, labels, affinity)  # (N, K) -> (N, C)


@torch.no_grad()
def search_alpha_beta(
    zero_shot: torch.Tensor, features: torch.Tensor, targets: torch.Tensor, keys: torch.Tensor,
    labels: torch.Tensor, alphas: Sequence[float], betas: Sequence[float],
) -> tuple[float, float, float]:
    """Best (alpha, beta, accuracy) on validation; ties go to the lower validation NLL."""
    num_classes = zero_shot.shape[1]
    cos = features @ keys.T  # (M, K), shared by every beta
    best = (-1.0, 0.0, 0.0, 0.0)  # accuracy, -nll, alpha, beta
    for n, beta in enumerate(betas):
        affinity = torch.exp(-beta * (1.0 - cos))
        cached = affinity.new_zeros(len(features), num_classes).index_add_(1, labels, affinity)
        for alpha in alphas:
            if alpha == 0 and n > 0:
                continue  # zero-shot does not depend on beta
            logits = zero_shot + alpha * cached
            acc = float((logits.argmax(-1) == targets).float().mean())
            cand = (acc, -float(F.cross_entropy(logits, targets)), alpha, beta)
            if cand[:2] > best[:2]:
                best = cand
    return best[2], best[3], best[0]


class TipAdapter(FeatureAdapter):
    """Zero-shot logits plus a cache of the training features, blended with (alpha, beta) from validation."""

    name = "tip-adapter"
    config_class = TipAdapterConfig

    def __init__(self, backend, classes, config, text: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor,
                 alpha: float, beta: float, base: BaseModel | None = None):
        super().__init__(backend, classes, config, base)
        self.text = text  # (C, D), logit scale folded in
        self.keys = keys  # (K, D)
        self.labels = labels  # (K,)
        self.alpha = alpha
        self.beta = beta

    @classmethod
    def fit(cls, backend: Backend, train: LabeledImages, val: LabeledImages, config: TipAdapterConfig,
            progress: bool = False) -> TipAdapter:
        data = FeatureData.build(backend, train, val, config.templates, progress=progress)
        views = encode_views(backend, train.paths, config.views, config.crop_scale, config.flip, config.seed,
                             progress=progress) if config.views else None
        return cls.fit_features(backend, train.classes, data, config, views)

    @classmethod
    def fit_features(cls, backend: Backend, classes: Sequence[str], data: FeatureData, config: TipAdapterConfig,
                     views: torch.Tensor | None = None) -> TipAdapter:
        """`views`: (V, N, D) augmented features of the N training images (None: clean features only)."""
        text = data.logit_scale * data.text
        keys = cache_keys(data.train, views)
        alpha, beta, acc = search_alpha_beta(data.val @ text.T, data.val, data.val_targets, keys,
                                             data.train_targets, config.alpha_grid, config.beta_grid)
        logger.info("%s: alpha=%g beta=%g chosen on validation (accuracy %.3f)", cls.name, alpha, beta, acc)
        return cls(backend, classes, config, text, keys, data.train_targets.clone(), alpha, beta)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(self.text)
        zero_shot = features @ self.text.T  # (N, D) @ (D, C) -> (N, C)
        return zero_shot + self.alpha * cache_logits(features, self.keys, self.labels, self.beta, len(self.classes))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"text": self.text, "keys": self.keys, "labels": self.labels}

    def extra_state(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta}

    @classmethod
    def from_state(cls, backend, classes, config, tensors, extra, base) -> TipAdapter:
        return cls(backend, classes, config, tensors["text"], tensors["keys"], tensors["labels"].long(),
                   float(extra["alpha"]), float(extra["beta"]), base)


register_adapter(TipAdapter)
