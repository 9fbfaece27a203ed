"""The strategy advisor behind `method="auto"`: the transfer-learning strategy matrix, measured and costed.

    |              | similar domain                         | different domain                         |
    | small data   | CLAP: a linear probe held to the       | LoRA in the attention layers (else the    |
    |              | zero-shot prototypes, no search        | image projection, ProLIP); a linear probe |
    |              |                                        | where frozen features already separate    |
    | medium data  | partial fine-tuning (last blocks + head)                                          |
    | large data   | full fine-tuning at a low learning rate, discriminative rates                     |

Everything is measured on the training images, so the validation images stay unused for the reported
accuracy: size is counted; similarity is zero-shot accuracy on the training images (zero-shot never
saw their labels, so this is an honest estimate), as a fraction of the way from chance to perfect;
separability is the cross-validated accuracy of a frozen linear probe on them.

Compute: a method is chosen only if its default schedule fits the budget on this device, estimated
from a timed forward pass of the image and text towers (`Adapter.default_seconds`); when the matrix's
choice does not fit, the next lighter strategy is taken and the advice says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from fsclip.adapters._augment import random_view
from fsclip.adapters._budget import Budget, format_seconds, plan_log
from fsclip.adapters._crossval import cross_validate, fold_count, one_standard_error, stratified_folds
from fsclip.adapters._features import FeatureData, load_images_or_fail
from fsclip.adapters.base import Costs
from fsclip.adapters.config import check_field
from fsclip.adapters.linear_probe import LinearProbe, LinearProbeConfig
from fsclip.adapters.registry import get_adapter
from fsclip.backends import Backend
from fsclip.data import LabeledImages
from fsclip.errors import AdapterError

__all__ = ["Advice", "AdvisorConfig", "advise", "measure_costs"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdvisorConfig:
    """Thresholds of the strategy matrix.

    Attributes:
        small_images: fewer training images than this is small data (the playbook's ~1,000).
        large_images: at least this many is large data.
        similar_zero_shot: zero-shot accuracy on the training images above chance, as a fraction of
            the way from chance (0) to perfect (1), at or above which the domain counts as similar.
        separable_probe: cross-validated frozen-probe accuracy at or above which the frozen features
            are good enough even for a different domain.
    """

    small_images: int = 1000
    large_images: int = 10000
    similar_zero_shot: float = 0.6
    separable_probe: float = 0.95

    def __post_init__(self):
        check_field(0 < self.small_images <= self.large_images, "small_images", self.small_images,
                    f"> 0 and <= large_images ({self.large_images})")
        check_field(0 <= self.similar_zero_shot <= 1, "similar_zero_shot", self.similar_zero_shot, "in [0, 1]")
        check_field(0 <= self.separable_probe <= 1, "separable_probe", self.separable_probe, "in [0, 1]")


@dataclass(frozen=True)
class Advice:
    method: str
    reason: str
    measurements: dict[str, Any] = field(default_factory=dict)
    compute: str = ""  # how the budget changed the choice, if it did
    options: dict[str, Any] = field(default_factory=dict)  # config the choice comes with (zero-shot: no C)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """Readable report: one line per measurement, then the choice and why."""
        out = [f"  {k:<32} {v:.3f}" if isinstance(v, float) else f"  {k:<32} {v}" for k, v in self.measurements.items()]
        tail = [f"compute: {self.compute}"] if self.compute else []
        return ["measurements (training images only):", *out, f"method: {self.method}", f"reason: {self.reason}",
                *tail]


@torch.inference_mode()
def measure_costs(backend: Backend, train: LabeledImages, budget: Budget, probe_images: int = 4) -> Costs:
    """Seconds per image and per prompt through the towers, timed on this device (second of two runs).

    An image's cost includes reading it and making an augmented, preprocessed view of it: for small
    models that, not the forward pass, is most of the time.
    """
    t0 = budget.clock()
    rng = np.random.default_rng(0)
    for img in load_images_or_fail(train.paths[:probe_images]):
        backend.preprocess(random_view(img, rng, backend.image_size))
    prepare = (budget.clock() - t0) / min(probe_images, len(train))
    backend.model.eval()
    size = backend.image_size
    pixels = torch.zeros(probe_images, 3, size, size, device=backend.device, dtype=backend.dtype)
    inputs = {k: v.to(backend.device) for k, v in backend.tokenize([f"a photo of a {c}." for c in
                                                                   train.classes[:probe_images]]).items()}
    image_s, text_s = [], []
    for _ in range(2):
        t0 = budget.clock()
        backend.forward_images(pixels).float().cpu()
        t1 = budget.clock()
        backend.forward_texts(inputs).float().cpu()
        image_s.append((t1 - t0) / probe_images)
        text_s.append((budget.clock() - t1) / len(inputs["input_ids"]))
    shots = min(train.counts().values())
    return Costs(images=len(train), shots=shots, classes=len(train.classes), image_seconds=prepare + image_s[-1],
                 text_seconds=text_s[-1])


def advise(backend: Backend, train: LabeledImages, templates="imagenet80", config: AdvisorConfig | None = None,
           *, budget: Budget | None = None, progress: bool = False, options: dict[str, Any] | None = None) -> Advice:
    """Measure data size, domain similarity and compute on the training images, and pick a method.

    `options`: the fit's option overrides, applied to the heads compared by cross-validation where
    they have them (e.g. `crop_scale`).
    """
    cfg = config or AdvisorConfig()
    budget = budget or Budget(math.inf)
    counts = train.counts()
    n_train, n_cls, shots = len(train), len(train.classes), min(counts.values())
    chance = 1.0 / n_cls
    m: dict[str, Any] = {"classes": n_cls, "training images": n_train, "images per class (min)": shots}
    size = "large" if n_train >= cfg.large_images else "medium" if n_train >= cfg.small_images else "small"
    m["data size"] = size

    data = FeatureData.build(backend, train, templates, progress=progress)
    targets = data.train_targets
    zs_acc = float(((data.train @ data.text.T).argmax(-1) == targets).float().mean())
    above = (zs_acc - chance) / (1 - chance)
    similar = above >= cfg.similar_zero_shot
    m["zero-shot accuracy (training)"] = zs_acc
    m["chance accuracy"] = chance
    m["zero-shot above chance"] = above
    m["domain"] = "similar" if similar else "different"

    costs = measure_costs(backend, train, budget)
    m["device"] = str(backend.device)
    m["image forward (s/image)"] = round(costs.image_seconds, 5)
    m["budget left"] = format_seconds(budget.remaining())

    if size == "large":
        return _done(_choose(["full-ft", "partial-ft", "linear-probe"], backend, costs, budget, m,
                       f"large data ({n_train} >= {cfg.large_images} images): fine-tune the whole image tower from "
                       "the pretrained weights at a low learning rate, earlier layers lowest"))
    if size == "medium":
        return _done(_choose(["partial-ft", "linear-probe"], backend, costs, budget, m,
                       f"medium data ({cfg.small_images} <= {n_train} < {cfg.large_images} images): keep the early "
                       "layers frozen and fine-tune the last blocks and the head"))
    if similar:
        advice = _choose(["clap", "linear-probe"], backend, costs, budget, m,
                         f"small data ({shots} image(s) per class) from a similar domain (zero-shot {above:.2f} of "
                         "the way from chance to perfect): keep the backbone frozen and adapt a head on the frozen "
                         "features")
        return _done(_cross_validated_head(backend, train, data, advice, budget, options or {}))
    if shots >= 2:
        probe = LinearProbe.fit_features(backend, train.classes, data, LinearProbeConfig(templates=templates))
        cv = probe.selection["cross-validation accuracy"]
        probe_acc = cv["zero-shot" if probe.c is None else f"{probe.c:g}"]
        m["frozen probe accuracy (cross-validated)"] = probe_acc
        if probe_acc >= cfg.separable_probe:
            return _done(_choose(["linear-probe"], backend, costs, budget, m,
                           f"small data from a different domain (zero-shot {above:.2f} of the way from chance), but a "
                           f"frozen probe already reaches {probe_acc:.2f} in cross-validation: the features separate "
                           "the classes, a linear head is enough"))
    else:
        probe_acc = None
        m["frozen probe accuracy (cross-validated)"] = "n/a (one image per class)"
    probe_text = f", frozen probe {probe_acc:.2f}" if probe_acc is not None else ""
    return _done(_choose(["lora", "prolip", "partial-ft", "clap"], backend, costs, budget, m,
                   f"small data from a different domain (zero-shot {above:.2f} of the way from chance{probe_text}): "
                   "keep the early layers' weights and adapt the image tower: low-rank updates of its attention "
                   "(LoRA), or, lighter, its final projection (ProLIP)"))


HEADS = ("zero-shot", "linear-probe", "tip-adapter", "clap")  # ties go to the earlier: the closest to zero-shot
CV_SHARE = 0.5  # of the budget left, for the cross-validated comparison of heads


def _cross_validated_head(backend: Backend, train: LabeledImages, data: FeatureData, advice: Advice, budget: Budget,
                          options: dict[str, Any]) -> Advice:
    """Which head on frozen features, chosen by stratified cross-validation on the training images.

    The frozen-feature heads differ most where the data is scarcest, and no rule picks the right one
    for every task: CLAP holds classes to their zero-shot prototypes, Tip-Adapter blends a cache with
    zero-shot, the probe's C spans zero-shot to a free probe, and zero-shot itself (the probe with no
    C) is a candidate, so `auto` does not go below it on these folds. Each head is fitted per fold on
    the other folds' images (their features and views are cached once) within an equal share of
    `CV_SHARE` of the budget. With a few images per fold a small lead is noise, so the head closest to
    zero-shot within one standard error of the best wins (Breiman's rule). Heads the budget or the
    model rule out are left out.
    """
    targets = data.train_targets
    folds = stratified_folds(targets, fold_count(min(train.counts().values())), seed=options.get("seed", 0))
    heads = [h for h in HEADS if h == "zero-shot" or (get_adapter(h).unsupported(backend) is None and (
        h == advice.method or h in ("linear-probe", "tip-adapter")))]
    share = budget.remaining() * CV_SHARE / max(1, (len(heads) - 1) * len(folds))
    scale = data.logit_scale

    def score(head: str, _fold: int, tr: torch.Tensor, ho: torch.Tensor) -> tuple[float]:
        if head == "zero-shot":
            logits = scale * data.train[ho] @ data.text.T
        else:
            cls = get_adapter(head)
            fields = cls.config_class.fields()
            config = cls.config_class().with_options(**{k: v for k, v in options.items() if k in fields})
            part = train.subset(tr.tolist())
            adapter = cls.fit(backend, part, part, config, budget=Budget(share, clock=budget.clock))
            logits = adapter.logits_from_features(data.train[ho])
        return (float((logits.float().argmax(-1) == targets[ho]).float().mean()),)

    plan_log.disabled = True  # the per-fold fits' plans would drown the advisor's own lines
    try:
        _, means, per_fold = cross_validate(len(targets), folds, heads, score)
    finally:
        plan_log.disabled = False
    best = one_standard_error(heads, per_fold)
    m = dict(advice.measurements)
    for head in heads:
        m[f"{head} accuracy (cross-validated)"] = round(means[head][0], 4)
    how = (f"{advice.reason}; by {len(folds)}-fold cross-validation on the training images, the head closest "
           f"to zero-shot within one standard error of the best: {best}")
    method = "linear-probe" if best == "zero-shot" else best  # the probe without a C is the zero-shot classifier
    return Advice(method, how, m, advice.compute, options={"c_grid": ()} if best == "zero-shot" else {})


def _choose(ranked: list[str], backend: Backend, costs: Costs, budget: Budget, m: dict[str, Any],
            reason: str) -> Advice:
    """The first method of `ranked` that works on this model and whose default schedule fits the budget."""
    skipped, runnable = [], []
    for method in ranked:
        cls = get_adapter(method)
        why_not = cls.unsupported(backend)
        if why_not is not None:
            skipped.append(f"{method} {why_not}")
            continue
        seconds = cls.default_seconds(costs)
        m[f"{method} default schedule (estimated)"] = format_seconds(seconds)
        runnable.append((seconds, method))
        if seconds <= budget.remaining():
            break
        skipped.append(f"{method}'s default schedule (about {format_seconds(seconds)} here) does not fit the "
                       f"{format_seconds(budget.remaining())} left of the budget")
    if not runnable:
        raise AdapterError(f"no method of {', '.join(ranked)} can run on {backend.spec!r}: {'; '.join(skipped)}")
    method = runnable[-1][1] if runnable[-1][0] <= budget.remaining() else min(runnable)[1]
    compute = ""
    if method != ranked[0]:
        compute = "; ".join(s for s in skipped if not s.startswith(f"{method} ")) + f": chose {method} instead"
    return Advice(method, reason, m, compute)


def _done(advice: Advice) -> Advice:
    for line in advice.lines():  # before the chosen method's long work starts
        plan_log.info("advisor: %s", line.strip())
    return advice
