"""Linear probe: multinomial logistic regression on frozen image features, anchored on zero-shot.

The CLIP paper's linear probe sweeps the inverse regularisation strength C on validation. Here the L2
penalty pulls the weights towards the zero-shot text classifier instead of towards 0 (the weights also
start there), in the spirit of LP++'s text-initialised blend: C -> 0 is exactly zero-shot, C -> inf a
free probe, and zero-shot itself is one of the candidates, so the validation-chosen probe is never
worse than zero-shot on validation, also at 1 shot. `zero_shot_prior=False` gives the plain CLIP-paper
probe (weights from zero, pulled towards zero).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fsclip.adapters._features import FeatureData
from fsclip.adapters._frozen import FeatureAdapter
from fsclip.adapters.base import BaseModel
from fsclip.adapters.config import AdapterConfig, check_field
from fsclip.adapters.registry import register_adapter
from fsclip.backends import Backend

__all__ = ["LinearProbe", "LinearProbeConfig", "fit_logistic"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearProbeConfig(AdapterConfig):
    """Options of the linear probe.

    Attributes:
        zero_shot_prior: start from and regularise towards the zero-shot classifier (else towards 0).
        c_grid: inverse L2 strengths tried on validation (sklearn's C: loss = C * sum(CE) + |W - prior|^2 / 2);
            the best one is then refined by half-decade steps, as in the CLIP paper's search.
        max_iter: L-BFGS iterations per fit (each fit warm-starts from the previous, stronger C).
    """

    zero_shot_prior: bool = True
    c_grid: tuple[float, ...] = (1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4)
    max_iter: int = 50

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.c_grid, list):
            object.__setattr__(self, "c_grid", tuple(self.c_grid))
        check_field(isinstance(self.zero_shot_prior, bool), "zero_shot_prior", self.zero_shot_prior, "true or false")
        check_field(len(self.c_grid) > 0 and all(c > 0 for c in self.c_grid), "c_grid", self.c_grid,
                    "a non-empty list of values > 0")
        check_field(isinstance(self.max_iter, int) and self.max_iter >= 1, "max_iter", self.max_iter, ">= 1")


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
    """Logistic regression on frozen features; `weight` and `bias` act in logit space."""

    name = "linear-probe"
    config_class = LinearProbeConfig

    def __init__(self, backend, classes, config, weight: torch.Tensor, bias: torch.Tensor, c: float | None,
                 base: BaseModel | None = None):
        super().__init__(backend, classes, config, base)
        self.weight = weight  # (C, D), logit scale folded in
        self.bias = bias  # (C,)
        self.c = c  # the selected C; None: zero-shot won on validation
        self.search: dict[str, float] = {}  # validation accuracy per C tried

    @classmethod
    @torch.no_grad()
    def fit_features(cls, backend: Backend, classes: Sequence[str], data: FeatureData,
                     config: LinearProbeConfig) -> LinearProbe:
        x, y, s = data.train, data.train_targets, data.logit_scale
        n_cls, dim = data.text.shape
        prior = data.text if config.zero_shot_prior else torch.zeros(n_cls, dim)
        zero_b = torch.zeros(n_cls)
        results: dict[float | None, tuple[tuple[float, float], torch.Tensor, torch.Tensor]] = {}
        if config.zero_shot_prior:
            results[None] = (_score(s * data.val @ prior.T, data.val_targets), prior, zero_b)

        def run(c: float, init) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.enable_grad():
                w, b = fit_logistic(x, y, prior, s, c, init, config.max_iter)
            results[c] = (_score(s * data.val @ w.T + b, data.val_targets), w, b)
            return w, b

        state = (prior, zero_b)
        for c in sorted(config.c_grid):  # strong -> weak regularisation, each warm-started
            state = run(c, state)
        grid = sorted(config.c_grid)
        best = max(results, key=lambda k: results[k][0])
        if best is not None:  # refine around the best C: half a decade either side
            for c in (best / 10**0.5, best * 10**0.5):
                if c not in results and grid[0] / 10 <= c <= grid[-1] * 10:
                    run(c, (results[best][1], results[best][2]))
            best = max(results, key=lambda k: results[k][0])
        (acc, _), w, b = results[best]
        logger.info("linear probe: C=%s chosen on validation (accuracy %.3f)", best, acc)
        adapter = cls(backend, classes, config, s * w, b, best)
        adapter.search = {("zero-shot" if k is None else f"{k:g}"): round(v[0][0], 4) for k, v in results.items()}
        return adapter

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.weight) @ self.weight.T + self.bias  # (N, D) @ (D, C) -> (N, C)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    def extra_state(self) -> dict[str, Any]:
        return {"C": self.c, "val_accuracy_by_C": self.search}

    @classmethod
    def from_state(cls, backend, classes, config, tensors, extra, base) -> LinearProbe:
        adapter = cls(backend, classes, config, tensors["weight"], tensors["bias"], extra.get("C"), base)
        adapter.search = extra.get("val_accuracy_by_C", {})
        return adapter


register_adapter(LinearProbe)
