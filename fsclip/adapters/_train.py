"""What the methods that train share: a private copy of the model, augmented image batches or cached
feature batches, and the one optimisation loop (sized by the compute budget; validation checks, early
stopping and restoring the best weights only when asked for).

Under torchrun / accelerate launch the loop is data-parallel (`fsclip.distributed.world`): every rank
draws the same global batch, computes the loss of its part, and DDP averages the gradients, so the
ranks take the steps one process would take with the same global batch and end with the same weights.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fsclip.adapters._augment import draw_view, make_view
from fsclip.adapters._budget import Budget, Progress, Schedule, median_seconds, plan_log
from fsclip.adapters._features import load_images_or_fail, shrink_image
from fsclip.backends import Backend
from fsclip.data import LabeledImages
from fsclip.distributed import world

__all__ = [
    "FeatureBatches",
    "ImageBatches",
    "ImageParams",
    "TrainResult",
    "autocast",
    "batched_features",
    "class_targets",
    "image_params",
    "preprocess_all",
    "run_training",
    "score",
    "shots_per_class",
    "trainable_copy",
]

logger = logging.getLogger(__name__)


def trainable_copy(backend: Backend) -> Backend:
    """A deep copy of `backend` in float32 (the caller's model is never modified).

    The copy's fingerprint is recomputed from its own weights once they change, so caches keyed by the
    fingerprint (label embeddings, features) never mix the adapted model with the base one.
    """
    # Share what holds no weights (tokenizers, image processors: large vocabularies, slow to copy);
    # deep-copy the model and whatever points into it (e.g. views of its text tower).
    memo = {id(v): v for v in vars(backend).values() if not _holds_weights(v)}
    out = copy.deepcopy(backend, memo)
    out.__dict__.pop("fingerprint", None)
    out.model.float()
    out.dtype = torch.float32
    return out


def _holds_weights(value) -> bool:
    weights = (nn.Module, torch.Tensor)
    return isinstance(value, weights) or any(isinstance(v, weights) for v in getattr(value, "__dict__", {}).values())


def autocast(device: torch.device):
    """bf16 autocast on CUDA GPUs that have it; float32 elsewhere (bf16 on CPU is slower, fp16 needs scaling)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class ImageParams:
    """Image-path parameters by depth: stem (patch/position embeddings), blocks (first to last), head."""

    stem: dict[str, nn.Parameter]
    blocks: list[dict[str, nn.Parameter]]
    head: dict[str, nn.Parameter]  # after the last block: final norm, projection to the joint space


def image_params(backend: Backend) -> ImageParams:
    """Find which parameters sit before, in and after the vision blocks, for any backend.

    Autograd tells: a backward pass from the image features reaches every image-path parameter; with
    the last block's output detached it reaches only those after the blocks.
    """
    model = backend.model
    names = {id(p): n for n, p in model.named_parameters()}
    blocks = [{names[id(p)]: p for p in b.parameters()} for b in backend.image_blocks()]
    in_blocks = {n for b in blocks for n in b}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    size = backend.image_size
    dummy = torch.zeros(1, 3, size, size, device=backend.device, dtype=backend.dtype)

    def reached(detach_last: bool) -> set[str]:
        def cut(_module, _inputs, out):
            return (out[0].detach(), *out[1:]) if isinstance(out, tuple) else out.detach()

        handle = backend.image_blocks()[-1].register_forward_hook(cut) if detach_last else None
        model.zero_grad(set_to_none=True)
        try:
            with torch.enable_grad():
                out = backend.forward_images(dummy)
                if out.requires_grad:  # else nothing after the last block has weights (a CNN's pooling)
                    out.sum().backward()
        finally:
            if handle is not None:
                handle.remove()
        found = {n for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return found

    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        path, after = reached(False), reached(True)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    params = dict(model.named_parameters())
    return ImageParams(
        stem={n: params[n] for n in sorted(path - after - in_blocks)},
        blocks=blocks,
        head={n: params[n] for n in sorted(after - in_blocks)},
    )


def preprocess_all(backend: Backend, data: LabeledImages, what: str) -> torch.Tensor:
    """(N, 3, H, W) model inputs of every image, exactly as `backend.preprocess` makes them."""
    images = load_images_or_fail(data.paths, what)
    return torch.stack([backend.preprocess(img) for img in images])


class ImageBatches:
    """Endless augmented, preprocessed batches: decode once, new crops and flips every epoch.

    Yields (pixels, targets, weight) of this rank's part of each global batch (`world.batch_part`;
    in one process the whole batch, weight 1). Every rank draws the crops and flips of the whole batch,
    in order, and makes only its own part: the global batch is the one a single process draws.
    """

    def __init__(self, backend: Backend, data: LabeledImages, batch_size: int, crop_scale: float, flip: bool,
                 seed: int):
        self.backend = backend
        size = backend.image_size
        # decode once; shrink big photos (a crop keeps >= scale of the area, so 2x model size is enough)
        self.images = [shrink_image(img, 2 * size) for img in load_images_or_fail(data.paths)]
        self.targets = torch.tensor(data.targets, dtype=torch.long)
        self.batch_size = min(batch_size, len(self.images))
        self.crop_scale, self.flip = crop_scale, flip
        self.rng = np.random.default_rng(seed)
        self.epoch = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
        size = self.backend.image_size
        while True:
            order = self.rng.permutation(len(self.images))
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                views = [draw_view(self.rng, *self.images[i].size, self.crop_scale, self.flip) for i in idx]
                own, weight = world.batch_part(len(idx))
                pixels = torch.stack([self.backend.preprocess(make_view(self.images[idx[k]], views[k], size))
                                      for k in own])
                yield pixels, self.targets[idx[own.start : own.stop]], weight
            self.epoch += 1


def score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(accuracy, -NLL): compare as a tuple, larger is better; NLL breaks accuracy ties."""
    logits, targets = logits.float().cpu(), targets.cpu()
    return float((logits.argmax(-1) == targets).float().mean()), -float(F.cross_entropy(logits, targets))


class FeatureBatches:
    """Endless shuffled batches of cached features: (V, N, D) augmented views of N images.

    `pool_views`: an epoch is one pass over all V x N features (CLAP's augmented set); otherwise
    epoch e sees view e mod V of every image (new crops every epoch, as when augmenting on the fly).
    Yields (features, targets, weight) of this rank's part of each batch, as `ImageBatches` does.
    """

    def __init__(self, views: torch.Tensor, targets: torch.Tensor, batch_size: int, seed: int,
                 pool_views: bool = False):
        self.views, self.targets = views, targets
        self.batch_size, self.pool_views = batch_size, pool_views
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        n = self.views.shape[0] * self.views.shape[1] if self.pool_views else self.views.shape[1]
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
        while True:
            if self.pool_views:
                x, y = self.views.reshape(-1, self.views.shape[-1]), self.targets.repeat(self.views.shape[0])
            else:
                x, y = self.views[self.epoch % self.views.shape[0]], self.targets
            for idx in torch.randperm(len(x), generator=self.gen).split(self.batch_size):
                own, weight = world.batch_part(len(idx))
                idx = idx[own.start : own.stop]
                yield x[idx], y[idx], weight
            self.epoch += 1


@dataclass
class TrainResult:
    best_step: int
    best_score: tuple[float, float] | None  # None: no validation checks (the default)
    steps: int
    schedule: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def _train_mode(model: nn.Module, norms: frozenset[int] = frozenset()) -> None:
    """Training mode (dropout, LoRA dropout on), except batch norm: its pretrained statistics are kept,
    since few-shot batches cannot estimate them; only the layers in `norms` (ids) use batch statistics."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in norms:
            m.eval()


def run_training(
    *,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    batches: ImageBatches | FeatureBatches,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: Schedule,
    budget: Budget,
    model: nn.Module | None = None,
    evaluate: Callable[[], tuple[float, float]] | None = None,
    eval_every: int = 0,
    patience: int = 0,
    keep_best: bool = False,
    warmup: int = 0,
    warmup_lr: float | None = None,
    on_epoch: Callable[[int], None] | None = None,
    desc: str = "training",
    progress: bool = False,
    measure: int = 3,
    norms: Sequence[nn.Module] = (),
) -> TrainResult:
    """The one optimisation loop of every method that trains: cosine-decayed, sized by the budget.

    The first `measure` steps are timed; `schedule` then fixes the number of steps from the measured
    step time and the budget left (or keeps the user's explicit count), and the plan is logged before
    the rest runs. The learning rate warms up for `warmup` steps (linearly, or held at `warmup_lr`),
    then follows a cosine to 0 at the planned end.

    Validation checks run only when `evaluate` is given (early stopping is opt-in: it spends the
    validation images on choosing a step). With `keep_best`, the weights end as those of the best
    check, which may be the starting point. Batch-norm layers keep their running statistics, except
    those in `norms`, which train on batch statistics (training from scratch has none to keep).

    Data-parallel under a launcher: `loss_fn` runs on each rank's part of the batch inside DDP, and
    what decides the schedule (the measured step time, via `Schedule.plan`) and early stopping (the
    validation score) is rank 0's, so every rank runs the same steps.
    """
    norm_ids = frozenset(id(m) for m in norms)
    total = {"steps": schedule.fixed or schedule.default}
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    def factor(s: int, base: float) -> float:
        if s < warmup:
            return warmup_lr / base if warmup_lr is not None else (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total["steps"] - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda s, b=b: factor(s, b) for b in base_lrs])
    history: list[dict] = []

    def check(step: int) -> tuple[float, float]:
        if model is not None:
            model.eval()
        with torch.no_grad():
            result = world.broadcast(evaluate())
        history.append({"step": step, "val_accuracy": round(result[0], 4), "val_nll": round(-result[1], 4),
                        "seconds": round(budget.elapsed(), 2)})
        logger.info("%s: step %d, validation accuracy %.3f, NLL %.3f", desc, step, result[0], -result[1])
        return result

    best = check(0) if evaluate is not None else None
    best_step, stale = 0, 0
    best_state = {n: p.detach().clone() for n, p in params.items()} if evaluate is not None and keep_best else None
    every = eval_every or max(1, total["steps"] // 10)
    epoch = -1
    device = next(iter(params.values())).device
    it = iter(batches)
    bar = Progress(total["steps"], desc, "step", progress, clock=budget.clock)
    durations: list[float] = []
    step, since = 0, (0, 0.0)
    step_loss = world.DataParallel(params, loss_fn, find_unused=on_epoch is not None)
    try:
        while step < total["steps"]:
            step += 1
            t0 = budget.clock()
            if on_epoch is not None and batches.epoch != epoch:
                epoch = batches.epoch
                on_epoch(epoch)
            inputs, targets, weight = next(it)
            if model is not None:
                _train_mode(model, norm_ids)
            with autocast(device):
                loss = step_loss(inputs.to(device), targets.to(device), weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
            value = loss.item()  # also waits for the device, so the step timing is real
            if schedule.planned is None:
                durations.append(budget.clock() - t0)
                if len(durations) >= min(measure, total["steps"]) or step >= total["steps"]:
                    total["steps"] = schedule.plan(budget, median_seconds(durations), done=step)
                    plan_log.info("%s", schedule.line(done=step))
                    bar.set_total(total["steps"])
                    every = eval_every or max(1, total["steps"] // 10)
                    since = (step, budget.clock())
            elif schedule.fixed is None and budget.limited and step - since[0] >= max(measure, total["steps"] // 4):
                # re-plan on the steps run since: a shared machine's speed drifts, the budget does not
                before = total["steps"]
                total["steps"] = schedule.plan(budget, (budget.clock() - since[1]) / (step - since[0]), done=step)
                since = (step, budget.clock())
                if abs(total["steps"] - before) > 0.1 * before:
                    plan_log.info("%s (re-planned at step %d)", schedule.line(done=step), step)
                    bar.set_total(total["steps"])
            bar.update(1, loss=value)
            if evaluate is not None and (step % every == 0 or step == total["steps"]):
                result = check(step)
                if result > best:
                    best, best_step, stale = result, step, 0
                    if best_state is not None:
                        best_state = {n: p.detach().clone() for n, p in params.items()}
                else:
                    stale += 1
                    if patience and stale >= patience:
                        logger.info("%s: no better validation score in %d checks; stopping at step %d",
                                    desc, stale, step)
                        break
        step_loss.check_same()
    finally:
        step_loss.close()
        bar.close()
        if model is not None:
            model.eval()
    if best_state is None:
        return TrainResult(step, best, step, schedule.to_dict(), history)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(best_state[n])
    logger.info("%s: kept the weights of step %d (validation accuracy %.3f)", desc, best_step, best[0])
    return TrainResult(best_step, best, step, schedule.to_dict(), history)


def batched_features(backend: Backend, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, 3, H, W) -> (N, D) normalised features without gradients, in batches."""
    out = [backend.forward_images(pixels[i : i + batch_size].to(backend.device, backend.dtype)).float()
           for i in range(0, len(pixels), batch_size)]
    return torch.cat(out)


def class_targets(data: LabeledImages) -> torch.Tensor:
    return torch.tensor(data.targets, dtype=torch.long)


def shots_per_class(data: LabeledImages) -> int:
    """The smallest number of training images of any class."""
    return min(len(ix) for ix in data.by_class().values())
