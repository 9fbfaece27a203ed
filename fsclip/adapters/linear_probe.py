"""Linear probe: multinomial logistic regression on frozen image features, regularised toward zero-shot.

The CLIP paper's linear probe sweeps the inverse L2 strength C. Here the L2 penalty pulls the weights
toward the zero-shot text classifier instead of toward 0 (and they start there): C -> 0 is exactly
zero-shot, C -> inf a free probe. C is chosen by stratified cross-validation on the training images
(zero-shot itself is a candidate): the strongest regularisation within one standard error of the best
cross-validated accuracy (Breiman's rule: with a few images per fold a small lead is noise), never on
the validation images, which stay for the reported accuracy. Without the prior, the C with the best
cross-validated likelihood; at one image per class, the middle of the grid. Prediction is
the probe alone. This is not LP++ (Huang et al., 2024), which blends text logits with learned
class-wise weights; for a probe constrained to the zero-shot prototypes without
any search, see `clap`. `zero_shot_prior=False` gives the plain CLIP-paper probe (from and toward 0),
which is what a model without a text tower gets: the playbook's head swap, a new linear classifier on
the frozen pooled features (the model's own classifier is never used).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fsclip.adapters._crossval import cross_validate, fold_count, one_standard_error, stratified_folds
from fsclip.adapters._features import FeatureData
from fsclip.adapters._frozen import FeatureAdapter
from fsclip.adapters.base import BaseModel
from fsclip.adapters.config import AdapterConfig, check_field
from fsclip.adapters.registry import register_adapter
from fsclip.backends import Backend
from fsclip.errors import UsageError

__all__ = ["LinearProbe", "LinearProbeConfig", "fit_logistic"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearProbeConfig(AdapterConfig):
    """Options of the linear probe.

    Attributes:
        zero_shot_prior: start from and regularise towards the zero-shot classifier (else towards 0);
            None: where the model has a text tower.
        c_grid: inverse L2 strengths tried (sklearn's C: loss = C * sum(CE) + |W - prior|^2 / 2); the best
            by cross-validation is then refined by half-decade steps, as in the CLIP paper's search. Empty
            (with `zero_shot_prior`): the probe is the zero-shot classifier itself.
        max_iter: L-BFGS iterations per fit (each fit warm-starts from the previous, stronger C).
        folds: cross-validation folds on the training images, at most (fewer with fewer images per class).
    """

    zero_shot_prior: bool | None = None
    c_grid: tuple[float, ...] = (1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4)
    max_iter: int = 50
    folds: int = 5

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.c_grid, list):
            object.__setattr__(self, "c_grid", tuple(self.c_grid))
        check_field(self.zero_shot_prior is None or isinstance(self.zero_shot_prior, bool), "zero_shot_prior",
                    self.zero_shot_prior, "true, false or None")
        check_field((len(self.c_grid) > 0 or self.zero_shot_prior is not False) and all(c > 0 for c in self.c_grid),
                    "c_grid", self.c_grid, "a list of values > 0, non-empty without the zero-shot prior")
        check_field(isinstance(self.max_iter, int) and self.max_iter >= 1, "max_iter", self.max_iter, ">= 1")
        check_field(isinstance(self.folds, int) and self.folds >= 2, "folds", self.folds, "an integer >= 2")


def fit_logistic(
    features: torch.Tensor, targets: torch.Tensor, prior: torch.Tensor, scale: float, c: float,
    init: tuple[torch.Tensor, torch.Tensor], max_iter: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise C * sum CE(scale * X W^T + b, y) + |W - prior|^2 / 2 by L-BFGS; returns (W, b).

    Solved on centred features (the mean's contribution, scale * mean W^T, moves into the bias, so W
    and the penalty are unchanged): CLIP features share a large common direction, and removing it
    makes the problem far better conditioned, i.e. a few times fewer L-BFGS iterations.
    """
    mean = features.mean(0)
    centred = features - mean
    w = init[0].clone().requires_grad_(True)
    b = (init[1] + scale * mean @ init[0].T).requires_grad_(True)  # bias of the centred problem
    reg = 1.0 / (2.0 * c * len(features))  # the objective divided by C * N: a mean loss
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=10, tolerance_grad=1e-5,
                            tolerance_change=1e-7, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = scale * centred @ w.T + b  # (N, D) @ (D, C) -> (N, C)
        loss = F.cross_entropy(logits, targets) + reg * (w - prior).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = w.detach()
    return w, b.detach() - scale * mean @ w.T


def _score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(accuracy, -NLL): larger is better, NLL breaks ties between equally accurate candidates."""
    return float((logits.argmax(-1) == targets).float().mean()), -float(F.cross_entropy(logits, targets))


class LinearProbe(FeatureAdapter):
    """Logistic regression on frozen features, C by cross-validation; `weight` and `bias` act in logit space."""

    name = "linear-probe"
    config_class = LinearProbeConfig

    def __init__(self, backend, classes, config, weight: torch.Tensor, bias: torch.Tensor, c: float | None,
                 base: BaseModel | None = None):
        super().__init__(backend, classes, config, base)
        self.weight = weight  # (C, D), logit scale folded in
        self.bias = bias  # (C,)
        self.c = c  # the selected C; None: zero-shot won the cross-validation

    @classmethod
    def needs_text(cls, config: LinearProbeConfig) -> bool:
        return config.zero_shot_prior is True

    @classmethod
    @torch.no_grad()
    def fit_features(cls, backend: Backend, classes: Sequence[str], data: FeatureData,
                     config: LinearProbeConfig) -> LinearProbe:
        x, y, s = data.train, data.train_targets, data.logit_scale
        if config.zero_shot_prior is None:  # recorded as resolved, so the saved config says what ran
            config = dataclasses.replace(config, zero_shot_prior=data.text is not None)
        if not config.c_grid and not config.zero_shot_prior:
            raise UsageError("c_grid is empty and the model has no text tower: the probe has no C to fit")
        n_cls, dim = data.num_classes, x.shape[1]
        prior = data.text if config.zero_shot_prior else torch.zeros(n_cls, dim)
        zero_b = torch.zeros(n_cls)
        shots = int(torch.bincount(y, minlength=n_cls).min())
        folds = stratified_folds(y, fold_count(shots, config.folds), config.seed)
        warm: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per fold: the last solution, to start from

        def score(c: float | None, fold: int, tr: torch.Tensor, ho: torch.Tensor) -> tuple[float, float]:
            if c is None:
                return _score(s * x[ho] @ prior.T, y[ho])
            with torch.enable_grad():
                w, b = fit_logistic(x[tr], y[tr], prior, s, c, warm.get(fold, (prior, zero_b)), config.max_iter)
            warm[fold] = (w, b)
            return _score(s * x[ho] @ w.T + b, y[ho])

        grid = sorted(config.c_grid)  # strong -> weak regularisation, each warm-started from the last
        candidates = ([None] if config.zero_shot_prior else []) + grid
        means: dict = {}
        chosen_by = f"{len(folds)}-fold cross-validation on the training images"
        if not grid:
            best, chosen_by = None, "no C to choose"
        elif not config.zero_shot_prior and shots < 2:
            best = grid[len(grid) // 2]
            chosen_by = ("the middle of c_grid: with one image per class, a held-out image's class has no other "
                         "image, so there is nothing to cross-validate")
        else:
            # With the prior, the strongest C is zero-shot itself, the simplest model: the strongest C within one
            # standard error of the best accuracy (Breiman). Without it, the strongest C only flattens the
            # probabilities toward uniform while accuracy stays flat: the best cross-validated likelihood (a
            # proper score, where accuracy on a few held-out images moves in steps of one image).
            rank = score if config.zero_shot_prior else lambda *a: score(*a)[::-1]
            top, means, per_fold = cross_validate(len(y), folds, candidates, rank)
            best = one_standard_error(candidates, per_fold) if config.zero_shot_prior else top
            if best is not None and best == top:  # refine around the best C: half a decade either side
                near = [c for c in (best / 10**0.5, best * 10**0.5) if grid[0] / 10 <= c <= grid[-1] * 10]
                warm.clear()
                best2, more, _ = cross_validate(len(y), folds, [best, *near], rank)
                means.update(more)
                best = best2
            if not config.zero_shot_prior:
                means = {k: v[::-1] for k, v in means.items()}  # back to (accuracy, -NLL)
        if best is None:
            w, b = prior, zero_b
        else:
            with torch.enable_grad():
                w, b = fit_logistic(x, y, prior, s, best, (prior, zero_b), config.max_iter)
        logger.info("linear probe: C=%s chosen by %s (accuracy %.3f)", best, chosen_by, means.get(best, (math.nan,))[0])
        adapter = cls(backend, classes, config, s * w, b, best)
        adapter.selection = {"C": "zero-shot" if best is None else best, "chosen by": chosen_by,
                             "cross-validation accuracy": {("zero-shot" if k is None else f"{k:g}"): round(v[0], 4)
                                                           for k, v in means.items()}}
        return adapter

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.weight) @ self.weight.T + self.bias  # (N, D) @ (D, C) -> (N, C)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    def extra_state(self) -> dict[str, Any]:
        return {"C": self.c}

    @classmethod
    def from_state(cls, backend, classes, config, tensors, extra, base) -> LinearProbe:
        return cls(backend, classes, config, tensors["weight"], tensors["bias"], extra.get("C"), base)


register_adapter(LinearProbe)
