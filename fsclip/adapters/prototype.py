"""Prototype classifier: nearest class mean on centred, L2-normalised features (SimpleShot, Wang et al., 2019).

SimpleShot's CL2N transform: subtract a mean feature, then L2-normalise; a class's prototype is the
mean of its transformed training features, and an image goes to the nearest prototype in Euclidean
distance. SimpleShot centres with the mean feature of its base classes; a few-shot fit here has no
base classes, so the centre is the mean of the training features (and the features are the
backend's, already L2-normalised once). Training-free: nothing is chosen, nothing is optimised, so
it is the zero-training baseline on any model, with or without a text tower.

    logits_c(x) = -scale * |CL2N(x) - p_c|^2

`scale` only sets how peaked the uncalibrated probabilities are; the validation temperature
calibrates them, and the ranking does not depend on it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fsclip.adapters._features import FeatureData
from fsclip.adapters._frozen import FeatureAdapter
from fsclip.adapters.base import BaseModel
from fsclip.adapters.config import AdapterConfig, check_field
from fsclip.adapters.registry import register_adapter
from fsclip.backends import Backend

__all__ = ["Prototype", "PrototypeConfig", "cl2n"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrototypeConfig(AdapterConfig):
    """Options of the prototype classifier.

    Attributes:
        center: subtract the training features' mean before normalising (SimpleShot's CL2N); False is
            SimpleShot's L2N (normalise only).
        scale: logits are -scale x squared distance (sets the sharpness of uncalibrated probabilities).
    """

    center: bool = True
    scale: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        check_field(isinstance(self.center, bool), "center", self.center, "true or false")
        check_field(self.scale > 0, "scale", self.scale, "> 0")


def cl2n(features: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(N, D) features -> (N, D) centred on `mean` (D,), then L2-normalised."""
    return F.normalize(features - mean, dim=-1)


class Prototype(FeatureAdapter):
    """Nearest class mean on CL2N features; `prototypes` (C, D) and `mean` (D,) are all it holds."""

    name = "prototype"
    config_class = PrototypeConfig

    def __init__(self, backend: Backend, classes: Sequence[str], config: PrototypeConfig, prototypes: torch.Tensor,
                 mean: torch.Tensor, base: BaseModel | None = None):
        super().__init__(backend, classes, config, base)
        self.prototypes = prototypes  # (C, D)
        self.mean = mean  # (D,), zeros when not centring

    @classmethod
    def needs_text(cls, config: PrototypeConfig) -> bool:
        return False

    @classmethod
    @torch.no_grad()
    def fit_features(cls, backend: Backend, classes: Sequence[str], data: FeatureData,
                     config: PrototypeConfig) -> Prototype:
        x, y = data.train, data.train_targets
        mean = x.mean(0) if config.center else torch.zeros(x.shape[1])
        z = cl2n(x, mean)
        n_cls = len(classes)
        sums = z.new_zeros(n_cls, z.shape[1]).index_add_(0, y, z)  # (C, D)
        counts = torch.bincount(y, minlength=n_cls).clamp(min=1).unsqueeze(1).to(z)
        adapter = cls(backend, classes, config, sums / counts, mean)
        adapter.selection = {"chosen by": "nothing: training-free (nearest class mean)"}
        logger.info("prototype: %d class means of %d training images", n_cls, len(y))
        return adapter

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        z = cl2n(features.to(self.prototypes), self.mean)
        # |z - p|^2 = |z|^2 - 2 z.p + |p|^2, and |z| = 1: (N, D) @ (D, C) -> (N, C)
        sq_dist = 1.0 - 2.0 * z @ self.prototypes.T + self.prototypes.pow(2).sum(-1)
        return -self.config.scale * sq_dist

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"prototypes": self.prototypes, "mean": self.mean}

    @classmethod
    def from_state(cls, backend, classes, config, tensors, extra, base) -> Prototype:
        return cls(backend, classes, config, tensors["prototypes"], tensors["mean"], base)


register_adapter(Prototype)
