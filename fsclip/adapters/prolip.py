"""ProLIP (Fahes et al., 2024): fine-tune only the image tower's final projection, kept near the pretrained one.

    min_W  CE(s * normalize(x W) . t_c)  +  lambda * |W - W0|_F^2

x: the pooled image features before the projection (cached: the rest of the tower is frozen), W0 the
pretrained projection, t_c the zero-shot class embeddings (the classifier stays the text one). The
paper's validation-free setting: Adam (lr 1e-2, eps 1e-4), lambda = 1 / K for K shots per class, 300
full-batch epochs with cosine decay, each on another random augmented view of every image (the paper
caches 300 views; here they are cut to the compute budget and reused in turn). Nothing is chosen on
validation images. Prediction runs the tower with the trained projection; only W is saved.

Needs a tower whose last layer is a separate linear projection after pooling (open_clip and
transformers ViTs); other towers (open_clip's ModifiedResNet, where the projection sits inside the
attention pooling) are refused with a one-line error.
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
from fsclip.adapters._features import encode_views
from fsclip.adapters._train import (
    FeatureBatches,
    class_targets,
    run_training,
    shots_per_class,
    trainable_copy,
)
from fsclip.adapters.base import Adapter, BaseModel
from fsclip.adapters.config import AdapterConfig, check_augmentation, check_counts, check_field
from fsclip.adapters.registry import register_adapter
from fsclip.backends import Backend
from fsclip.data import LabeledImages
from fsclip.errors import AdapterError
from fsclip.prompts_io import load_templates
from fsclip.zeroshot import build_text_classifier

__all__ = ["Prolip", "ProlipConfig"]

logger = logging.getLogger(__name__)
DEFAULT_VIEWS, DEFAULT_EPOCHS = 300, 300


@dataclass(frozen=True)
class ProlipConfig(AdapterConfig):
    """Options of ProLIP; the defaults are the paper's validation-free setting.

    Attributes:
        views: augmented views per training image; None: the paper's 300, cut to the compute budget.
        epochs: full-batch epochs; None: the paper's 300, cut to the compute budget.
        lr: Adam learning rate.
        penalty: weight of |W - W0|^2; None: 1 / K for K training images per class (the paper's rule).
        crop_scale: smallest area fraction of the random resized crop.
        flip: random horizontal flips in the views.
    """

    views: int | None = None
    epochs: int | None = None
    lr: float = 1e-2
    penalty: float | None = None
    crop_scale: float = 0.5
    flip: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_counts(self, "views", "epochs")
        check_field(self.lr > 0, "lr", self.lr, "> 0")
        check_field(self.penalty is None or self.penalty >= 0, "penalty", self.penalty, ">= 0 or None")
        check_augmentation(self)


def _projection(backend: Backend) -> torch.nn.Parameter:
    name = backend.image_projection()
    if name is None:
        raise AdapterError(f"prolip trains the image tower's final linear projection, and {backend.spec!r} has "
                           f"none separate from its pooling ({type(backend.image_tower).__name__}); "
                           "use clap, tip-adapter or linear-probe")
    return dict(backend.model.named_parameters())[name]


class Prolip(Adapter):
    """The base model with a fine-tuned image projection; classifies with the zero-shot text embeddings."""

    name = "prolip"
    config_class = ProlipConfig
    frozen_backbone = False
    views_share = 0.8  # of the budget left, for encoding views: the training steps are cheap

    @classmethod
    def unsupported(cls, backend: Backend) -> str | None:
        if backend.image_projection() is None:
            return f"needs a separate final image projection, and {backend.spec!r}'s image tower has none"
        return super().unsupported(backend)

    @classmethod
    def default_seconds(cls, costs: Costs) -> float:
        return DEFAULT_VIEWS * costs.images * costs.image_seconds

    def __init__(self, backend: Backend, classes: Sequence[str], config: ProlipConfig, text: torch.Tensor,
                 base: BaseModel):
        super().__init__(backend, classes, config, base)
        self.text = text  # (C, D) zero-shot class embeddings, logit scale folded in

    @classmethod
    def fit(cls, backend: Backend, train: LabeledImages, val: LabeledImages, config: ProlipConfig,
            progress: bool = False, budget: Budget | None = None) -> Prolip:
        budget = budget or Budget(float("inf"))
        base = BaseModel.of(backend)
        w0 = _projection(backend).detach().float().cpu()
        text = build_text_classifier(backend, train.classes, load_templates(config.templates)).float().cpu()
        views, view_plan = encode_views(backend, train.paths, config.views or DEFAULT_VIEWS, config.crop_scale,
                                        config.flip, config.seed, progress=progress, budget=budget,
                                        fixed=config.views is not None, share=cls.views_share, pooled=True,
                                        what="prolip views")
        targets = class_targets(train)
        shots = shots_per_class(train)
        penalty = config.penalty if config.penalty is not None else 1.0 / shots
        weight = torch.nn.Parameter(w0.clone())
        scale = backend.logit_scale

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            features = F.normalize(backend.project_image(x, weight), dim=-1)
            return F.cross_entropy(scale * features @ text.T, y) + penalty * (weight - w0).pow(2).sum()

        batches = FeatureBatches(views, targets, len(targets), config.seed)  # full batch, one view per epoch
        schedule = Schedule("prolip training", "step", default=DEFAULT_EPOCHS, fixed=config.epochs)
        opt = torch.optim.Adam([weight], lr=config.lr, eps=1e-4)
        result = run_training(params={"weight": weight}, optimizer=opt, batches=batches, loss_fn=loss_fn,
                              schedule=schedule, budget=budget, desc="prolip", progress=progress)
        adapter = cls.from_state(backend, train.classes, config, {"projection": weight.detach(), "text": scale * text},
                                 {}, base)
        adapter.selection = {"penalty": penalty, "chosen by": "the paper's validation-free rule 1/K; nothing chosen "
                                                              "on data",
                             "views": view_plan.to_dict(), "training": result.schedule}
        return adapter

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.text) @ self.text.T  # (N, D) @ (D, C) -> (N, C)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"projection": _projection(self.backend), "text": self.text}

    def extra_state(self) -> dict[str, Any]:
        return {"projection": self.backend.image_projection()}

    @classmethod
    def from_state(cls, backend, classes, config, tensors, extra, base) -> Prolip:
        own = trainable_copy(backend)
        param = _projection(own)
        if tuple(tensors["projection"].shape) != tuple(param.shape):
            raise AdapterError(f"projection of shape {tuple(tensors['projection'].shape)} does not fit "
                               f"{backend.spec!r} ({tuple(param.shape)})")
        with torch.no_grad():
            param.copy_(tensors["projection"].to(param))
        own.model.requires_grad_(False)
        own.__dict__.pop("fingerprint", None)
        return cls(own, classes, config, tensors["text"].float(), base)


register_adapter(Prolip)
