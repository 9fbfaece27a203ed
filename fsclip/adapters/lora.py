"""LoRA in the attention of both encoders, via PEFT (the CLIP-LoRA recipe, Zanella & Ben Ayed, 2024).

Separate low-rank updates (rank 2, alpha 1, dropout 0.25 on their input) of the query, key and value
projections (not the output projection) of every attention layer in the blocks of the image and text
towers, trained with AdamW (lr 2e-4, cosine) on cross-entropy between image features and the
class-prompt text embeddings times the model's logit scale, for 500 iterations per shot at batch 32
(cut to the compute budget). Each step encodes the class names with one prompt template drawn at
random; prediction uses the average over all templates (the zero-shot ensemble).

open_clip fuses q, k and v into one `nn.MultiheadAttention` weight; the adapted copy gets split q, k, v
projections first (`Backend.split_attention`, numerically identical), so PEFT wraps each as a
`nn.Linear`, as it does transformers CLIP's q_proj, k_proj and v_proj. An image tower without
attention blocks (open_clip's ModifiedResNet: RN50, ...) is refused unless `towers="text"`.

On a model without a text tower (timm, transformers image backbones) there are no class prompts:
LoRA adapts the image tower under a linear head started from the linear probe on the frozen
features (LP-FT: step 0 is the probe) and trained with it. The updates go into the attention
projections of the blocks (timm's fused `qkv`, transformers' query / key / value: ViT, Swin, DINOv2)
or, in a CNN, into every ordinary (not grouped or depthwise) `nn.Conv2d` of its stages, which PEFT's
LoRA supports; batch-norm statistics stay the pretrained ones. No published recipe exists for LoRA
on CNN backbones; the CLIP-LoRA hyper-parameters are kept.

Only the LoRA weights are saved; `merge` writes a standalone model folder with them folded in (fused
back into the library's own attention layout).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import peft
import torch
import torch.nn.functional as F

from fsclip.adapters._budget import Budget
from fsclip.adapters._costs import Costs
from fsclip.adapters._export import write_model_folder
from fsclip.adapters._train import (
    ImageBatches,
    batched_features,
    class_targets,
    preprocess_all,
    run_training,
    score,
    shots_per_class,
    trainable_copy,
)
from fsclip.adapters.base import Adapter, BaseModel
from fsclip.adapters.config import TrainingConfig, check_field
from fsclip.adapters.registry import register_adapter
from fsclip.backends import Backend
from fsclip.data import LabeledImages
from fsclip.errors import AdapterError, UsageError
from fsclip.prompts_io import fill, load_templates
from fsclip.zeroshot import build_text_classifier

__all__ = ["LoraAdapter", "LoraAdapterConfig"]

logger = logging.getLogger(__name__)
_TOWERS = ("both", "image", "text")


@dataclass(frozen=True)
class LoraAdapterConfig(TrainingConfig):
    """Options of LoRA (besides the training options); defaults are the CLIP-LoRA recipe.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA scaling numerator (the update is scaled by alpha / rank).
        dropout: dropout on the input of each low-rank update.
        towers: which encoders get LoRA: both, image or text.
        iters_per_shot: default schedule length, in steps per training image of the smallest class (cut
            to the compute budget unless `iters` or `epochs` is set).
    """

    rank: int = 2
    alpha: float = 1.0
    dropout: float = 0.25
    towers: Literal["both", "image", "text"] = "both"
    iters_per_shot: int = 500

    def __post_init__(self):
        super().__post_init__()
        check_field(isinstance(self.rank, int) and self.rank >= 1, "rank", self.rank, "an integer >= 1")
        check_field(self.alpha > 0, "alpha", self.alpha, "> 0")
        check_field(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        check_field(self.towers in _TOWERS, "towers", self.towers, f"one of {', '.join(_TOWERS)}")
        check_field(isinstance(self.iters_per_shot, int) and self.iters_per_shot >= 1, "iters_per_shot",
                    self.iters_per_shot, "an integer >= 1")


def _attention_suffixes(backend: Backend) -> tuple[str, ...]:
    try:
        return tuple(backend.attention_target_modules())
    except UsageError:  # a CNN: no attention projections anywhere
        return ()


def _conv_targets(backend: Backend) -> list[str]:
    """Full names of the ordinary convolutions in the image tower's blocks (PEFT's LoRA needs the rank
    divisible by `groups`, so grouped and depthwise convolutions are left alone)."""
    inside = {id(m) for block in backend.image_blocks() for m in block.modules()}
    return [n for n, m in backend.model.named_modules()
            if id(m) in inside and isinstance(m, torch.nn.Conv2d) and m.groups == 1]


def _target_modules(backend: Backend, towers: str) -> list[str]:
    """Full names of the q, k, v projections to adapt: inside the image tower's blocks and the text tower;
    without a text tower and without attention, the convolutions of the image tower's blocks."""
    suffixes = _attention_suffixes(backend)
    scopes = {"image": backend.image_blocks, "text": lambda: [backend.text_tower]}
    names = []
    for tower in ("image", "text") if towers == "both" else (towers,):
        inside = {id(m) for scope in scopes[tower]() for m in scope.modules()}
        found = [n for n, m in backend.model.named_modules()
                 if id(m) in inside and n.rsplit(".", 1)[-1] in suffixes and isinstance(m, torch.nn.Linear)]
        if not found and not backend.has_text:
            found = _conv_targets(backend)
            if not found:
                raise AdapterError(f"lora: the image tower of {backend.spec!r} ({type(backend.image_tower).__name__})"
                                   " has neither attention projections nor ordinary convolutions in its blocks for "
                                   "PEFT to adapt; use partial-ft")
        if not found:
            kind = type(backend.image_tower if tower == "image" else backend.text_tower).__name__
            hint = "; use towers='text', or another method (clap, partial-ft)" if tower == "image" else ""
            raise AdapterError(f"lora: the {tower} tower of {backend.spec!r} ({kind}) has no attention blocks "
                               f"with q, k, v projections{hint}")
        names += found
    return names


def _inject(backend: Backend, config: LoraAdapterConfig, targets: list[str]) -> peft.PeftModel:
    """Add LoRA layers to `backend.model` in place (it keeps working as before); freeze everything else."""
    lora = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                           target_modules=targets, bias="none")
    try:
        return peft.get_peft_model(backend.model, lora)
    except ValueError as e:
        raise AdapterError(f"cannot add LoRA to {backend.spec!r}: {str(e).splitlines()[0]}") from None


class LoraAdapter(Adapter):
    """CLIP with LoRA in both towers, classifying with its own class-prompt embeddings; on an image-only
    model, LoRA in the image tower under a linear head."""

    name = "lora"
    config_class = LoraAdapterConfig
    frozen_backbone = False

    @classmethod
    def needs_text(cls, config: LoraAdapterConfig) -> bool:
        return config.towers == "text"  # "both" is the image tower alone on an image-only model

    @classmethod
    def unsupported(cls, backend: Backend) -> str | None:
        try:
            blocks = backend.image_blocks()
        except (AdapterError, UsageError) as e:
            return str(e)
        suffixes = _attention_suffixes(backend)
        if not backend.has_text and not suffixes and not _conv_targets(backend):
            return (f"needs attention projections or ordinary convolutions in the image tower's blocks, and "
                    f"{backend.spec!r}'s ({type(backend.image_tower).__name__}) has none")
        if backend.has_text and not any(isinstance(m, torch.nn.MultiheadAttention) or n.rsplit(".", 1)[-1] in suffixes
                                        for b in blocks for n, m in b.named_modules()):
            return (f"needs q, k, v projections in the image tower's attention blocks, and {backend.spec!r}'s "
                    f"({type(backend.image_tower).__name__}) has none it can adapt")
        return super().unsupported(backend)

    @classmethod
    def finish_seconds(cls, costs: Costs, val_images: int, prompts: int) -> float:
        # a fresh copy of the model rebuilt from the LoRA weights re-encodes every class prompt
        return val_images * costs.image_seconds + prompts * costs.text_seconds

    @classmethod
    def default_seconds(cls, costs: Costs) -> float:
        config = LoraAdapterConfig()
        steps = config.iters_per_shot * costs.shots
        return steps * costs.train_step(min(config.batch_size, costs.images), costs.classes)

    def __init__(self, backend: Backend, classes: Sequence[str], config: LoraAdapterConfig,
                 peft_model: peft.PeftModel, text: torch.Tensor | None, targets: list[str], base: BaseModel,
                 head: torch.nn.Linear | None = None):
        super().__init__(backend, classes, config, base)
        self.peft_model = peft_model
        self.text = text  # (C, D) class embeddings of the adapted text tower, logit scale folded in
        self.head = head  # the linear head instead, on a model without a text tower
        self.targets = targets
        self.train_result: dict[str, Any] = {}

    @classmethod
    def fit(cls, backend: Backend, train: LabeledImages, val: LabeledImages, config: LoraAdapterConfig,
            progress: bool = False, budget: Budget | None = None) -> LoraAdapter:
        budget = budget or Budget(float("inf"))
        if not backend.has_text:
            return cls._fit_head(backend, train, val, config, progress, budget)
        base = BaseModel.of(backend)
        own = trainable_copy(backend)
        own.split_attention()
        targets = _target_modules(own, config.towers)
        peft_model = _inject(own, config, targets)
        n_lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        logger.info("lora: %d projections (q, k, v), %d trainable parameters", len(targets), n_lora)
        scale = backend.logit_scale
        templates = load_templates(config.templates)
        device = own.device
        tokens = [{k: v.to(device) for k, v in own.tokenize([fill(t, c) for c in train.classes]).items()}
                  for t in templates]
        text_trains = config.towers in ("both", "text")
        fixed_text = None if text_trains else build_text_classifier(backend, train.classes, templates).float()
        rng = np.random.default_rng(config.seed)

        def class_embeddings() -> torch.Tensor:  # (C, D), one random template, with gradients
            if fixed_text is not None:
                return fixed_text
            return own.forward_texts(tokens[int(rng.integers(len(tokens)))])

        def ensemble() -> torch.Tensor:  # (C, D), all templates averaged, as at prediction time
            if fixed_text is not None:
                return fixed_text
            return F.normalize(torch.stack([own.forward_texts(t) for t in tokens]).mean(0), dim=-1)

        def loss_fn(pixels: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = scale * own.forward_images(pixels) @ class_embeddings().T  # (B, D) @ (D, C) -> (B, C)
            return F.cross_entropy(logits.float(), y)

        def logits(features: torch.Tensor) -> torch.Tensor:
            return scale * features @ ensemble().T

        result, evaluate = cls._train(own, peft_model, [], train, val, config, loss_fn, logits, progress, budget)
        # Rebuild from the LoRA weights on a fresh copy, exactly as `load` will: merging folds the update
        # into the base weights, and a fresh copy keeps the saved weights the only source of truth.
        lora = {f"lora.{k}": v.detach().clone() for k, v in peft.get_peft_model_state_dict(peft_model).items()}
        fresh = cls.from_state(backend, train.classes, config, lora, {"target_modules": targets}, base)
        text = scale * build_text_classifier(fresh.backend, train.classes, templates, use_cache=False).float()
        fresh.text = text
        return cls._finish(fresh, result, evaluate, config)

    @classmethod
    def _fit_head(cls, backend: Backend, train: LabeledImages, val: LabeledImages, config: LoraAdapterConfig,
                  progress: bool, budget: Budget) -> LoraAdapter:
        """LoRA in the image tower of a model without a text tower, under a linear head (LP-FT)."""
        from fsclip.adapters.linear_probe import LinearProbe, LinearProbeConfig

        if config.towers == "text":
            raise AdapterError(f"lora towers=text needs a text tower, and {backend.spec!r} has none; "
                               "use towers=image")
        config = dataclasses.replace(config, towers="image")  # recorded as what ran
        base = BaseModel.of(backend)
        probe = LinearProbe.fit(backend, train, val, LinearProbeConfig(seed=config.seed))
        own = trainable_copy(backend)
        own.split_attention()
        targets = _target_modules(own, "image")
        peft_model = _inject(own, config, targets)
        head = torch.nn.Linear(backend.embed_dim, len(train.classes)).to(own.device)
        with torch.no_grad():
            head.weight.copy_(probe.weight)
            head.bias.copy_(probe.bias)
        logger.info("lora: %d image-tower modules, %d trainable parameters and the head", len(targets),
                    sum(p.numel() for p in peft_model.parameters() if p.requires_grad))

        def loss_fn(pixels: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(head(own.forward_images(pixels)).float(), y)

        result, evaluate = cls._train(own, peft_model, list(head.parameters()), train, val, config, loss_fn, head,
                                      progress, budget)
        lora = {f"lora.{k}": v.detach().clone() for k, v in peft.get_peft_model_state_dict(peft_model).items()}
        tensors = {**lora, "head.weight": head.weight.detach().clone(), "head.bias": head.bias.detach().clone()}
        fresh = cls.from_state(backend, train.classes, config, tensors, {"target_modules": targets}, base)
        fresh.selection = {"probe C": probe.selection.get("C")}
        return cls._finish(fresh, result, evaluate, config)

    @classmethod
    def _train(cls, own: Backend, peft_model: peft.PeftModel, extra: list[torch.nn.Parameter], train: LabeledImages,
               val: LabeledImages, config: LoraAdapterConfig, loss_fn, logits, progress: bool, budget: Budget):
        """The optimisation shared by both kinds: the LoRA weights (and `extra`, e.g. a head), AdamW, cosine."""
        evaluate = None
        if config.validates or config.val_curve:  # the curve only reports; choosing a step spends the images
            val_pixels, val_y = preprocess_all(own, val, "validation image"), class_targets(val)

            def evaluate() -> tuple[float, float]:
                return score(logits(batched_features(own, val_pixels)), val_y)

        batches = ImageBatches(own, train, config.batch_size, config.crop_scale, config.flip, config.seed)
        schedule = config.schedule("lora training", len(batches), config.iters_per_shot * shots_per_class(train))
        params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
        params.update({f"head.{i}": p for i, p in enumerate(extra)})
        opt = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999))
        result = run_training(params=params, optimizer=opt, batches=batches, loss_fn=loss_fn, schedule=schedule,
                              budget=budget, model=own.model, evaluate=evaluate, eval_every=config.eval_every,
                              patience=config.patience, keep_best=config.keep_best, desc="lora", progress=progress)
        result.schedule["steps_per_epoch"] = len(batches)
        return result, evaluate

    @staticmethod
    def _finish(adapter: LoraAdapter, result, evaluate, config: LoraAdapterConfig) -> LoraAdapter:
        adapter.train_result = {"best_step": result.best_step, "steps_run": result.steps, "schedule": result.schedule,
                                "steps_per_epoch": result.schedule.pop("steps_per_epoch"), "history": result.history}
        if evaluate is not None and config.validates:
            adapter.validation_uses.append("early stopping" if config.patience else "choosing the best step")
        return adapter

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            return self.head(features.to(self.head.weight))  # (N, D) @ (D, C) + (C,) -> (N, C)
        return features.to(self.text) @ self.text.T  # (N, D) @ (D, C) -> (N, C)

    def state_dict(self) -> dict[str, torch.Tensor]:
        lora = peft.get_peft_model_state_dict(self.peft_model)
        if self.head is not None:
            classifier = {f"head.{n}": p for n, p in self.head.named_parameters()}
        else:
            classifier = {"text": self.text}
        return {**classifier, **{f"lora.{k}": v for k, v in lora.items()}}

    def extra_state(self) -> dict[str, Any]:
        return {"target_modules": self.targets, "training": self.train_result}

    @classmethod
    def from_state(cls, backend, classes, config, tensors, extra, base) -> LoraAdapter:
        own = trainable_copy(backend)
        own.split_attention()
        peft_model = _inject(own, config, list(extra["target_modules"]))
        lora = {k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")}
        loaded = peft.set_peft_model_state_dict(peft_model, lora)
        unexpected = getattr(loaded, "unexpected_keys", [])
        if unexpected:
            raise AdapterError(f"LoRA weights do not fit {backend.spec!r}: unexpected {unexpected[:3]}")
        peft_model.merge_adapter()  # fold the update into the weights: plain-speed inference
        own.__dict__.pop("fingerprint", None)
        head = None
        if "head.weight" in tensors:
            weight = tensors["head.weight"]
            head = torch.nn.Linear(weight.shape[1], weight.shape[0]).to(own.device)
            head.load_state_dict({"weight": weight, "bias": tensors["head.bias"]})
            head.requires_grad_(False)
        text = tensors.get("text")  # absent while `fit` rebuilds the model, and with a head
        adapter = cls(own, classes, config, peft_model, text, list(extra["target_modules"]), base, head)
        adapter.train_result = extra.get("training", {})
        return adapter

    def merge(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the base model with the LoRA update folded in, as a folder that loads as a model spec.

        Zero-shot classification with that model, the same class names and templates gives this
        adapter's logits (before calibration). Not for an image-only model, whose head is no part of it.
        """
        if self.head is not None:
            raise UsageError("--merge writes a CLIP model whose class prompts give this adapter's logits; an "
                             "image-only model's LoRA adapter classifies with its own head, so load the adapter "
                             "folder itself")
        # the weights are merged already (`from_state`): unloading keeps them and drops the LoRA layers
        merged = self.backend.fuse_attention(copy.deepcopy(self.peft_model).unload())
        note = {"merged_from": self.base.spec, "base_fingerprint": self.base.fingerprint, "adapter": self.name,
                "classes": list(self.classes), "templates": self.config.to_dict()["templates"]}
        out = write_model_folder(self.backend, merged, path, note, overwrite=overwrite)
        logger.info("wrote merged model to %s", out)
        return out


register_adapter(LoraAdapter)
