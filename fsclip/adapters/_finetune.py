"""Fine-tuning of the image tower under a classification head fitted first (LP-FT).

The head starts as a linear probe on the frozen features (anchored on the zero-shot text classifier
where the model has a text tower), so step 0 is already the probe and training only has to improve on
it; with `probe_init=False` it starts as the zero-shot classifier, or, without a text tower, as a new
randomly initialised linear layer. The practices of the transfer-learning playbook: discriminative
learning rates (head highest, then each block lower than the one above it, the stem lowest), optional
gradual unfreezing from the top down, augmentation (random resized crop, optional flip), weight decay;
early stopping on validation with the best checkpoint restored when asked for (`patience`,
`keep_best`: it spends the validation images on choosing a step). 30 epochs by default, cut to the
compute budget. The text tower stays frozen. "Blocks" are the backend's `image_blocks()`: transformer
blocks, or a CNN's stages (timm's feature stages, a transformers encoder's stages).

Batch norm (CNNs): layers in frozen stages always keep their pretrained statistics; by default the
trained stages keep them too (`batch_norm="frozen"`: a few-shot batch cannot estimate them, and
re-estimating them shifts every feature under a head fitted on the old ones), while their affine
weights train; `batch_norm="train"` lets the trained stages normalise with batch statistics and
re-estimate their running statistics, for large data from a different domain.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fsclip.adapters._budget import Budget
from fsclip.adapters._costs import Costs
from fsclip.adapters._train import (
    ImageBatches,
    batched_features,
    class_targets,
    image_params,
    preprocess_all,
    run_training,
    score,
    trainable_copy,
)
from fsclip.adapters.base import Adapter, BaseModel
from fsclip.adapters.config import TrainingConfig, check_field
from fsclip.backends import Backend
from fsclip.data import LabeledImages
from fsclip.errors import AdapterError
from fsclip.prompts_io import load_templates
from fsclip.zeroshot import build_text_classifier

__all__ = ["FineTuneAdapter", "FineTuneConfig", "param_groups"]

logger = logging.getLogger(__name__)
DEFAULT_EPOCHS = 30


@dataclass(frozen=True)
class FineTuneConfig(TrainingConfig):
    """Options of fine-tuning (besides the training options).

    Attributes:
        head_lr: learning rate of the classification head (the newest layer, so the highest).
        layer_decay: learning-rate factor per block going down from the top (discriminative rates).
        gradual_unfreeze: start with the backbone frozen and unfreeze one more block per epoch, top down.
        probe_init: start the head from a linear probe fitted on the frozen features (LP-FT), not from
            the zero-shot classifier (or, without a text tower, a random one); see `FineTuneAdapter.fit`.
        batch_norm: "frozen": every batch-norm layer keeps its pretrained statistics; "train": those in
            the trained stages use batch statistics and re-estimate their running statistics (frozen
            stages keep theirs either way).
    """

    lr: float = 1e-4
    head_lr: float = 1e-3
    layer_decay: float = 0.7
    gradual_unfreeze: bool = False
    probe_init: bool = True
    batch_norm: Literal["frozen", "train"] = "frozen"

    def __post_init__(self):
        super().__post_init__()
        check_field(self.head_lr > 0, "head_lr", self.head_lr, "> 0")
        check_field(0 < self.layer_decay <= 1, "layer_decay", self.layer_decay, "in (0, 1]")
        check_field(isinstance(self.gradual_unfreeze, bool), "gradual_unfreeze", self.gradual_unfreeze,
                    "true or false")
        check_field(isinstance(self.probe_init, bool), "probe_init", self.probe_init, "true or false")
        check_field(self.batch_norm in ("frozen", "train"), "batch_norm", self.batch_norm, "frozen or train")


def param_groups(head: nn.Module, units: list[tuple[str, dict[str, nn.Parameter]]],
                 config: FineTuneConfig) -> list[dict]:
    """AdamW groups with discriminative learning rates.

    `units` run from the top of the image tower down (projection head, last block, ..., stem); the
    classifier gets `head_lr`, the first unit `lr`, each further unit `layer_decay` times the one above.
    Weight decay applies to matrices only (not to norms, biases and embeddings' scales).
    """
    named = [("classifier", dict(head.named_parameters()), config.head_lr)]
    named += [(name, params, config.lr * config.layer_decay ** depth) for depth, (name, params) in enumerate(units)]
    groups = []
    for name, params, lr in named:
        for decay, members in ((config.weight_decay, [p for p in params.values() if p.ndim >= 2]),
                               (0.0, [p for p in params.values() if p.ndim < 2])):
            if members:
                groups.append({"params": members, "lr": lr, "weight_decay": decay, "name": name})
    return groups


def _initial_head(backend: Backend, train: LabeledImages, val: LabeledImages, config: FineTuneConfig,
                  selection: dict) -> nn.Linear:
    """The classifier training starts from: a linear probe on the frozen features, or zero-shot.

    A head far from good (zero-shot on classes the model never saw is near chance) sends large
    gradients into the backbone in the first steps and distorts the pretrained features before the
    head has learnt anything; a probe fitted first avoids that (LP-FT, Kumar et al. 2022), and the
    probe costs no encoding when its features are cached.
    """
    if not config.probe_init and not backend.has_text:  # nothing to start from: a new layer, as in a head swap
        return nn.Linear(backend.embed_dim, len(train.classes))
    if config.probe_init:
        from fsclip.adapters.linear_probe import LinearProbe, LinearProbeConfig

        probe = LinearProbe.fit(backend, train, val, LinearProbeConfig(templates=config.templates, seed=config.seed))
        selection["probe C"] = probe.selection.get("C")
        weight, bias = probe.weight, probe.bias
    else:
        weight = backend.logit_scale * build_text_classifier(backend, train.classes, load_templates(config.templates))
        bias = torch.zeros(len(train.classes))
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight.float())
        head.bias.copy_(bias.float())
    return head


def _batch_norms(model: nn.Module, trained: dict[str, nn.Parameter]) -> dict[str, nn.Module]:
    """The batch-norm layers (by name) whose affine weights are among `trained`."""
    ids = {id(p) for p in trained.values()}
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and id(m.weight) in ids}


class FineTuneAdapter(Adapter):
    """Base of `partial-ft`, `full-ft` and `scratch`: they differ in how many blocks they train and in
    where training starts (`starting_point`)."""

    frozen_backbone = False
    default_epochs: ClassVar[int] = DEFAULT_EPOCHS

    @classmethod
    def needs_text(cls, config: FineTuneConfig) -> bool:
        return False  # without a text tower the head starts from a probe without prior, or a new layer

    @classmethod
    def default_seconds(cls, costs: Costs) -> float:
        batch = min(cls.config_class.batch_size, costs.images)
        steps = cls.default_epochs * -(-costs.images // batch)
        return costs.images * costs.image_seconds + steps * costs.train_step(batch, 0)

    def __init__(self, backend: Backend, classes: Sequence[str], config: FineTuneConfig, head: nn.Linear,
                 trained: list[str], base: BaseModel, feature_scale: float = 1.0):
        super().__init__(backend, classes, config, base)
        self.head = head
        self.trained = trained  # names of the backbone tensors this adapter changed (weights, norm statistics)
        self.feature_scale = feature_scale  # the head reads feature_scale x the normalised features
        self.train_result: dict[str, Any] = {}

    @classmethod
    def blocks_to_train(cls, config: FineTuneConfig, n_blocks: int) -> int:
        """How many of the last blocks to unfreeze."""
        raise NotImplementedError

    @classmethod
    def trains_stem(cls, config: FineTuneConfig, n_blocks: int) -> bool:
        return cls.blocks_to_train(config, n_blocks) == n_blocks

    @classmethod
    def starting_point(cls, backend: Backend, train: LabeledImages, val: LabeledImages, config: FineTuneConfig,
                       selection: dict) -> tuple[Backend, nn.Linear, float]:
        """The private model copy to train, the head it starts with, and the scale of the features the head
        reads: the pretrained weights under a probe (or zero-shot) head on the normalised features."""
        return trainable_copy(backend), _initial_head(backend, train, val, config, selection), 1.0

    @classmethod
    def fit(cls, backend: Backend, train: LabeledImages, val: LabeledImages, config: FineTuneConfig,
            progress: bool = False, budget: Budget | None = None) -> FineTuneAdapter:
        budget = budget or Budget(float("inf"))
        base = BaseModel.of(backend)
        selection: dict[str, Any] = {}
        own, head, feature_scale = cls.starting_point(backend, train, val, config, selection)
        head = head.to(own.device)
        parts = image_params(own)
        n_blocks = len(parts.blocks)
        k = cls.blocks_to_train(config, n_blocks)
        stem = cls.trains_stem(config, n_blocks)

        # units from the top down: projection head, last block, ..., first trained block, (stem)
        named_units = [("projection", parts.head),
                       *((f"block {i}", parts.blocks[i]) for i in reversed(range(n_blocks - k, n_blocks))),
                       *([("stem", parts.stem)] if stem else [])]
        units = [params for _, params in named_units]
        own.model.requires_grad_(False)
        for unit in units:
            for p in unit.values():
                p.requires_grad_(True)
        groups = param_groups(head, named_units, config)
        trained = {n: p for unit in units for n, p in unit.items()}
        trainable = {f"head.{n}": p for n, p in head.named_parameters()}
        trainable.update({f"model.{n}": p for n, p in trained.items()})
        norms = _batch_norms(own.model, trained) if config.batch_norm == "train" else {}
        logger.info("%s: training %d of %d blocks%s and the head; %d parameters%s", cls.name, k, n_blocks,
                    " and the stem" if stem else "", sum(p.numel() for p in trainable.values()),
                    f"; {len(norms)} batch-norm layers on batch statistics" if norms else "")

        def on_epoch(epoch: int) -> None:
            # epoch 0: heads only; then one more unit per epoch, top down
            for depth, unit in enumerate(units):
                for p in unit.values():
                    p.requires_grad_(depth <= epoch)

        def loss_fn(pixels: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(head(feature_scale * own.forward_images(pixels)).float(), y)

        evaluate = None
        if config.validates or config.val_curve:  # the curve only reports; choosing a step spends the images
            val_pixels, val_y = preprocess_all(own, val, "validation image"), class_targets(val)

            def evaluate() -> tuple[float, float]:
                return score(head(feature_scale * batched_features(own, val_pixels)), val_y)

        batches = ImageBatches(own, train, config.batch_size, config.crop_scale, config.flip, config.seed)
        schedule = config.schedule(f"{cls.name} training", len(batches), cls.default_epochs * len(batches))
        opt = torch.optim.AdamW(groups, lr=config.lr)
        result = run_training(params=trainable, optimizer=opt, batches=batches, loss_fn=loss_fn, schedule=schedule,
                              budget=budget, model=own.model, evaluate=evaluate,
                              eval_every=config.eval_every or len(batches), patience=config.patience,
                              keep_best=config.keep_best, on_epoch=on_epoch if config.gradual_unfreeze else None,
                              desc=cls.name, progress=progress, norms=list(norms.values()))
        for p in own.model.parameters():
            p.requires_grad_(False)
        own.__dict__.pop("fingerprint", None)
        head.requires_grad_(False)
        statistics = [f"{n}.{b}" for n, m in norms.items() for b, _ in m.named_buffers(recurse=False)]
        adapter = cls(own, train.classes, config, head, sorted([*trained, *statistics]), base, feature_scale)
        adapter.selection = selection
        if config.validates:
            adapter.validation_uses.append("early stopping" if config.patience else "choosing the best step")
        adapter.train_result = {"best_step": result.best_step, "steps_run": result.steps, "schedule": result.schedule,
                                "steps_per_epoch": len(batches), "blocks_trained": k, "blocks": n_blocks,
                                "batch_norm": config.batch_norm,
                                "learning_rates": {g["name"]: g["initial_lr"] for g in groups}, "history": result.history}
        return adapter

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        # (N, D) @ (D, C) + (C,) -> (N, C)
        return self.head(self.feature_scale * features.to(self.head.weight))

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = self.backend.model.state_dict(keep_vars=True)
        out = {f"head.{n}": p for n, p in self.head.named_parameters()}
        out.update({f"model.{n}": tensors[n] for n in self.trained})
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"training": self.train_result, "feature_scale": self.feature_scale}

    @classmethod
    def from_state(cls, backend, classes, config, tensors, extra, base) -> FineTuneAdapter:
        own = trainable_copy(backend)
        model_sd = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        result = own.model.load_state_dict(model_sd, strict=False)
        if result.unexpected_keys:
            raise AdapterError(f"fine-tuned weights do not fit {backend.spec!r}: unexpected "
                               f"{result.unexpected_keys[:3]}")
        own.model.requires_grad_(False)
        own.__dict__.pop("fingerprint", None)
        weight = tensors["head.weight"]
        head = nn.Linear(weight.shape[1], weight.shape[0]).to(own.device)
        head.load_state_dict({"weight": weight, "bias": tensors["head.bias"]})
        head.requires_grad_(False)
        adapter = cls(own, classes, config, head, sorted(model_sd), base, float(extra.get("feature_scale", 1.0)))
        adapter.train_result = extra.get("training", {})
        return adapter
