"""CoOp (Zhou et al., IJCV 2022): learned context vectors in front of each class name, in the text tower.

The prompt of class c is [SOS] v_1 ... v_16 [name of c] . [EOS]: 16 context vectors shared by all
classes, in the token-embedding space, initialised N(0, 0.02), with the class token at the end (the
paper's default). They are trained by cross-entropy between the logit scale times the cosine of image
and prompt features, through the frozen text tower; the image features are cached augmented views
(random resized crop, flip), one view per epoch, where the paper augments on the fly.

The paper's schedule: SGD (lr 0.002, momentum 0.9, weight decay 5e-4), batch 32, one warm-up epoch at
lr 1e-5, cosine decay; 50 epochs at 1 shot, 100 at 2 and 4, 200 at 8 and 16, cut to the compute
budget. Nothing is chosen on validation images. Prediction needs only the learned prompts' embeddings
(computed once), so test images use the base model's cached features.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fsclip.adapters._budget import Budget, Schedule
from fsclip.adapters._costs import Costs
from fsclip.adapters._features import encode_views
from fsclip.adapters._frozen import FeatureAdapter
from fsclip.adapters._train import FeatureBatches, class_targets, run_training, shots_per_class
from fsclip.adapters.base import BaseModel
from fsclip.adapters.config import AdapterConfig, check_augmentation, check_counts, check_field
from fsclip.adapters.registry import register_adapter
from fsclip.backends import Backend
from fsclip.data import LabeledImages
from fsclip.errors import AdapterError

__all__ = ["Coop", "CoopConfig", "paper_epochs"]

logger = logging.getLogger(__name__)
PLACEHOLDER = "X"


def paper_epochs(shots: int) -> int:
    """CoOp's epochs for K shots per class: 50 at 1, 100 at 2-4, 200 from 8 (the paper's configs)."""
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


@dataclass(frozen=True)
class CoopConfig(AdapterConfig):
    """Options of CoOp; the defaults are the paper's.

    Attributes:
        n_ctx: number of learned context vectors.
        epochs: passes over the training images; None: the paper's schedule for the number of shots,
            cut to the compute budget.
        lr: peak SGD learning rate.
        batch_size: images per step.
        views: cached augmented views, one per epoch and reused in turn; None: one per epoch, cut to
            a quarter of the compute budget.
        crop_scale: smallest area fraction of the random resized crop.
        flip: random horizontal flips in the views.
    """

    n_ctx: int = 16
    epochs: int | None = None
    lr: float = 2e-3
    batch_size: int = 32
    views: int | None = None
    crop_scale: float = 0.5
    flip: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_field(isinstance(self.n_ctx, int) and 1 <= self.n_ctx <= 64, "n_ctx", self.n_ctx, "an integer in [1, 64]")
        check_counts(self, "views", "epochs")
        check_field(self.lr > 0, "lr", self.lr, "> 0")
        check_field(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        check_augmentation(self)


class Prompts:
    """Tokenised "X X ... X {class}." prompts whose placeholder embeddings are replaced by context vectors."""

    def __init__(self, backend: Backend, classes: Sequence[str], n_ctx: int):
        self.backend = backend
        self.embedding = backend.text_token_embedding()
        if self.embedding is None:
            raise AdapterError(f"coop learns prompts in the token-embedding space, which {backend.spec!r}'s text "
                               "tower does not expose; use clap or tip-adapter")
        context = " ".join([PLACEHOLDER] * n_ctx)
        self.inputs = {k: v.to(backend.device) for k, v in
                       backend.tokenize([f"{context} {name}." for name in classes]).items()}
        ids = self.inputs["input_ids"]
        alone = backend.tokenize([context])["input_ids"][0]
        counts = torch.bincount(alone)
        if not (counts == n_ctx).any():
            raise AdapterError("coop: the tokenizer did not keep the context placeholders as single tokens")
        marker = int((counts == n_ctx).nonzero()[0])
        self.start = self._run_start(ids, marker, n_ctx)
        self.n_ctx = n_ctx

    @staticmethod
    def _run_start(ids: torch.Tensor, marker: int, n: int) -> int:
        """Where the n placeholder tokens start: the same position in every prompt (they come first)."""
        hits = (ids == marker).int()
        runs = hits.unfold(1, n, 1).sum(-1) == n  # (C, L - n + 1): a full run starts here
        if not runs.any(1).all():
            raise AdapterError("coop: the tokenizer did not keep the context placeholders as single tokens")
        starts = runs.int().argmax(1)
        if not (starts == starts[0]).all():
            raise AdapterError("coop: the context placeholders landed at different positions")
        return int(starts[0])

    @contextlib.contextmanager
    def context(self, ctx: torch.Tensor) -> Iterator[None]:
        """While inside, the text tower sees `ctx` (n_ctx, W) in place of the placeholders."""
        start, end = self.start, self.start + self.n_ctx

        def swap(_module, _inputs, out: torch.Tensor) -> torch.Tensor:
            return torch.cat([out[:, :start], ctx.to(out.dtype).expand(len(out), -1, -1), out[:, end:]], dim=1)

        handle = self.embedding.register_forward_hook(swap)
        try:
            yield
        finally:
            handle.remove()

    def encode(self, ctx: torch.Tensor) -> torch.Tensor:
        """(C, D) normalised class features of the prompts with context `ctx`."""
        with self.context(ctx):
            return self.backend.forward_texts(self.inputs).float()


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No gradients into `module`'s own weights (the caller's model), restored afterwards."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class Coop(FeatureAdapter):
    """Zero-shot classification with learned prompts; the image side is the base model's."""

    name = "coop"
    trains_text = True
    config_class = CoopConfig
    views_share = 0.25  # of the budget left, for encoding views: the text-tower steps are the costly part

    @classmethod
    def unsupported(cls, backend: Backend) -> str | None:
        if backend.text_token_embedding() is None:
            return f"needs the text tower's token embeddings, which {backend.spec!r} does not expose"
        return super().unsupported(backend)

    @classmethod
    def default_seconds(cls, costs: Costs) -> float:
        epochs = paper_epochs(costs.shots)
        steps = epochs * -(-costs.images // CoopConfig.batch_size)
        return epochs * costs.images * costs.image_seconds + steps * costs.train_step(0, costs.classes)

    def __init__(self, backend: Backend, classes: Sequence[str], config: CoopConfig, context: torch.Tensor,
                 text: torch.Tensor, base: BaseModel | None = None):
        super().__init__(backend, classes, config, base)
        self.context = context  # (n_ctx, W) learned context vectors
        self.text = text  # (C, D) class features of the learned prompts, logit scale folded in

    @classmethod
    def fit(cls, backend: Backend, train: LabeledImages, val: LabeledImages, config: CoopConfig,
            progress: bool = False, budget: Budget | None = None) -> Coop:
        budget = budget or Budget(float("inf"))
        prompts = Prompts(backend, train.classes, config.n_ctx)
        epochs = config.epochs or paper_epochs(shots_per_class(train))
        views, view_plan = encode_views(backend, train.paths, config.views or epochs, config.crop_scale, config.flip,
                                        config.seed, progress=progress, budget=budget,
                                        fixed=config.views is not None, share=cls.views_share, what="coop views")
        width = prompts.embedding.weight.shape[1]
        init = torch.randn(config.n_ctx, width, generator=torch.Generator().manual_seed(config.seed)) * 0.02
        ctx = nn.Parameter(init.to(backend.device))
        scale = backend.logit_scale

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            text = prompts.encode(ctx)  # (C, D), through the frozen text tower
            return F.cross_entropy(scale * x.to(text) @ text.T, y)

        batches = FeatureBatches(views, class_targets(train), config.batch_size, config.seed)
        epoch_steps = len(batches)
        schedule = Schedule("coop training", "step", default=epochs * epoch_steps,
                            fixed=config.epochs * epoch_steps if config.epochs else None)
        opt = torch.optim.SGD([ctx], lr=config.lr, momentum=0.9, weight_decay=5e-4)
        backend.model.eval()
        with _frozen(backend.model):
            result = run_training(params={"context": ctx}, optimizer=opt, batches=batches, loss_fn=loss_fn,
                                  schedule=schedule, budget=budget, warmup=epoch_steps, warmup_lr=1e-5,
                                  desc="coop", progress=progress)
            with torch.no_grad():
                text = scale * prompts.encode(ctx.detach()).cpu()
        adapter = cls(backend, train.classes, config, ctx.detach().cpu(), text)
        adapter.selection = {"chosen by": "the paper's defaults, nothing searched", "views": view_plan.to_dict(),
                             "training": result.schedule}
        return adapter

    @classmethod
    def fit_features(cls, backend, classes, data, config) -> Coop:
        raise AdapterError("coop trains through the text tower; fit it with `fit`, not from features alone")

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(self.text) @ self.text.T  # (N, D) @ (D, C) -> (N, C)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"context": self.context, "text": self.text}

    def extra_state(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_state(cls, backend, classes, config, tensors, extra, base) -> Coop:
        return cls(backend, classes, config, tensors["context"], tensors["text"], base)


register_adapter(Coop)
