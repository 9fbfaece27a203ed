"""Tip-Adapter (Zhang et al., 2022): a training-free key/value cache of few-shot features.

    logits = s * f W_text^T + alpha * exp(-beta * (1 - f K^T)) L

with K the cache keys, L their one-hot labels (values), s the model's logit scale. As in the paper, a
key is the average feature of `views` random augmented views of a training image (10 random-crop
epochs), computed once and cached; the views are cut to fit the compute budget.

alpha (how much to trust the cache) and beta (how sharp the affinity is) are chosen by stratified
cross-validation on the training images (a held-out image's own key leaves the cache), never on the
validation images; alpha = 0 is plain zero-shot and always a candidate. With one image per class there
is nothing to cross-validate (holding out an image empties its class's cache), so the reference
implementation's starting values alpha = 1, beta = 1 apply.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from fsclip.adapters._budget import Budget, Schedule
from fsclip.adapters._costs import Costs
from fsclip.adapters._crossval import cross_validate, fold_count, stratified_folds
from fsclip.adapters._features import FeatureData, encode_views
from fsclip.adapters._frozen import FeatureAdapter
from fsclip.adapters.base import BaseModel
from fsclip.adapters.config import AdapterConfig, check_augmentation, check_field
from fsclip.adapters.registry import register_adapter
from fsclip.backends import Backend
from fsclip.data import LabeledImages

__all__ = ["TipAdapter", "TipAdapterConfig", "cache_keys", "cache_logits", "cross_validate_alpha_beta"]

logger = logging.getLogger(__name__)
DEFAULT_ALPHA, DEFAULT_BETA = 1.0, 1.0  # the reference implementation's starting values


@dataclass(frozen=True)
class TipAdapterConfig(AdapterConfig):
    """Options of Tip-Adapter.

    Attributes:
        alpha_grid: cache weights tried by cross-validation (in logits; for a logit scale of 100, as the paper's).
        beta_grid: affinity sharpness values tried by cross-validation.
        views: augmented views (random resized crop, flip) per training image whose features, averaged,
            make the cache keys (the paper's 10 augmentation epochs); 0: the clean features. None: 10,
            cut to the compute budget. Views are encoded once and cached.
        crop_scale: smallest area fraction of the random resized crop.
        flip: random horizontal flips in the views.
        folds: cross-validation folds on the training images, at most.
    """

    alpha_grid: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0)
    beta_grid: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0, 5.5, 7.0, 9.0, 12.0, 16.0, 20.0, 25.0)
    views: int | None = None
    crop_scale: float = 0.5
    flip: bool = True
    folds: int = 5

    def __post_init__(self):
        super().__post_init__()
        for name in ("alpha_grid", "beta_grid"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
                value = tuple(value)
            check_field(len(value) > 0 and all(v >= 0 for v in value), name, value, "a non-empty list of values >= 0")
        check_field(self.views is None or (isinstance(self.views, int) and self.views >= 0), "views", self.views,
                    "an integer >= 0 or None")
        check_field(isinstance(self.folds, int) and self.folds >= 2, "folds", self.folds, "an integer >= 2")
        check_augmentation(self)


def cache_keys(features: torch.Tensor, views: torch.Tensor | None) -> torch.Tensor:
    """(N, D) keys: each training image's (V, N, D) augmented views averaged and renormalised (clean without)."""
    if views is None or not len(views):
        return features.clone()
    return F.normalize(views.mean(0), dim=-1)


def cache_logits(features: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, beta: float,
                 num_classes: int) -> torch.Tensor:
    """(N, D) features, (K, D) keys, (K,) labels -> (N, C) summed affinities per class."""
    affinity = torch.exp(-beta * (1.0 - features @ keys.T))  # (N, D) @ (D, K) -> (N, K)
    return affinity.new_zeros(len(features), num_classes).index_add_(1, labels, affinity)  # (N, K) -> (N, C)


@torch.no_grad()
def cross_validate_alpha_beta(
    text: torch.Tensor, features: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor,
    alphas: Sequence[float], betas: Sequence[float], folds: int, seed: int,
) -> tuple[float, float, dict[str, Any]]:
    """(alpha, beta, what chose them): by cross-validation on the training images, or the defaults at 1 shot.

    `features` are the clean training features (queries), `keys` the cache keys of the same images;
    in each fold the held-out images are scored against the cache of the others.
    """
    n_cls = text.shape[0]
    shots = int(torch.bincount(labels, minlength=n_cls).min())
    if shots < 2:
        return DEFAULT_ALPHA, DEFAULT_BETA, {"chosen by": "defaults (one image per class: nothing to cross-validate)"}
    held_out = stratified_folds(labels, fold_count(shots, folds), seed)
    zero_shot = features @ text.T  # (N, C), logit scale folded into text
    cos = features @ keys.T  # (N, N)
    cands = [(0.0, betas[0])] + [(a, b) for b in betas for a in alphas if a > 0]  # zero-shot first: ties keep it

    def score(cand, fold, tr, ho) -> tuple[float, float]:
        alpha, beta = cand
        cached = torch.exp(-beta * (1.0 - cos[ho][:, tr]))  # (H, T)
        logits = zero_shot[ho] + alpha * cached.new_zeros(len(ho), n_cls).index_add_(1, labels[tr], cached)
        return float((logits.argmax(-1) == labels[ho]).float().mean()), -float(F.cross_entropy(logits, labels[ho]))

    (alpha, beta), means, _ = cross_validate(len(labels), held_out, cands, score)
    return alpha, beta, {"chosen by": f"{len(held_out)}-fold cross-validation on the training images",
                         "cross-validation accuracy": round(means[(alpha, beta)][0], 4)}


class TipAdapter(FeatureAdapter):
    """Zero-shot logits plus a cache of the training features, blended with cross-validated (alpha, beta)."""

    name = "tip-adapter"
    config_class = TipAdapterConfig
    default_views: ClassVar[int] = 10  # the paper's augmentation epochs for the cache

    @classmethod
    def default_seconds(cls, costs: Costs) -> float:
        return (1 + cls.default_views) * costs.images * costs.image_seconds

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
            progress: bool = False, budget: Budget | None = None) -> TipAdapter:
        data = FeatureData.build(backend, train, config.templates, progress=progress)
        views, schedule = cls.encode_views(backend, train, config, budget, progress)
        adapter = cls.fit_features(backend, train.classes, data, config, views, budget=budget, progress=progress)
        adapter.selection["views"] = schedule.to_dict()
        return adapter

    @classmethod
    def encode_views(cls, backend: Backend, train: LabeledImages, config: TipAdapterConfig, budget: Budget | None,
                     progress: bool, share: float = 1.0) -> tuple[torch.Tensor | None, Schedule]:
        """The augmented views the cache (and training) use: `config.views`, or the default cut by the budget."""
        fixed = config.views is not None
        views = config.views if fixed else cls.default_views
        if views == 0:
            return None, Schedule("cache views", "view", default=0, fixed=0, planned=0, reason="as given")
        feats, schedule = encode_views(backend, train.paths, views, config.crop_scale, config.flip, config.seed,
                                       progress=progress, budget=budget, fixed=fixed, share=share,
                                       what=f"{cls.name} views")
        return feats, schedule

    @classmethod
    def fit_features(cls, backend: Backend, classes: Sequence[str], data: FeatureData, config: TipAdapterConfig,
                     views: torch.Tensor | None = None, budget: Budget | None = None,
                     progress: bool = False) -> TipAdapter:
        """`views`: (V, N, D) augmented features of the N training images (None: clean features only)."""
        text = data.logit_scale * data.text
        keys = cache_keys(data.train, views)
        alpha, beta, how = cross_validate_alpha_beta(text, data.train, keys, data.train_targets, config.alpha_grid,
                                                     config.beta_grid, config.folds, config.seed)
        logger.info("%s: alpha=%g beta=%g (%s)", cls.name, alpha, beta, how["chosen by"])
        adapter = cls(backend, classes, config, text, keys, data.train_targets.clone(), alpha, beta)
        adapter.selection = {"alpha": alpha, "beta": beta, **how}
        return adapter

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
