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

Without a text tower (image-only backbones) there is no zero-shot accuracy to measure, and no model
card here gives the pretraining data's feature statistics to compare with, so the advice says it could
not take either; the domain gap is read from the frozen probe alone. Small data: one image per class
gets the training-free prototype classifier (nothing can be cross-validated); features a frozen probe
separates (>= `separable_probe`) get a head on them, prototype or linear probe by cross-validation;
otherwise partial fine-tuning (or LoRA where it fits the budget better). Medium and large data as above.

Compute: a method is chosen only if its default schedule fits the budget on this device, estimated
from a timed forward pass of the image and text towers (`Adapter.default_seconds`); when the matrix's
choice does not fit, the next lighter strategy is taken and the advice says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fsclip.adapters._budget import Budget, format_seconds, plan_log
from fsclip.adapters._costs import Costs, measure_costs
from fsclip.adapters._crossval import fold_count, one_standard_error, stratified_folds
from fsclip.adapters._features import FeatureData
from fsclip.adapters.config import check_field
from fsclip.adapters.linear_probe import LinearProbe, LinearProbeConfig
from fsclip.adapters.registry import get_adapter
from fsclip.backends import Backend
from fsclip.data import LabeledImages
from fsclip.errors import AdapterError

__all__ = ["Advice", "AdvisorConfig", "advise"]

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


def advise(backend: Backend, train: LabeledImages, templates="imagenet80", config: AdvisorConfig | None = None,
           *, budget: Budget | None = None, progress: bool = False, options: dict[str, Any] | None = None,
           costs: Costs | None = None) -> Advice:
    """Measure data size, domain similarity and compute on the training images, and pick a method.

    `options`: the fit's option overrides, applied to the heads compared by cross-validation where
    they have them (e.g. `crop_scale`). `costs`: already measured (`measure_costs`), else measured here.
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
    m["chance accuracy"] = chance
    if data.text is not None:
        zs_acc = float(((data.train @ data.text.T).argmax(-1) == targets).float().mean())
        above = (zs_acc - chance) / (1 - chance)
        similar = above >= cfg.similar_zero_shot
        m["zero-shot accuracy (training)"] = zs_acc
        m["zero-shot above chance"] = above
        m["domain"] = "similar" if similar else "different"
    else:
        m["zero-shot accuracy (training)"] = "not measured: the model has no text tower"
        m["feature statistics vs pretraining"] = "not measured: the model card gives no pretraining feature statistics"

    costs = costs or measure_costs(backend, train, budget)
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
    if data.text is None:
        return _done(_small_image_only(backend, train, data, cfg, costs, budget, m, options or {}))
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
IMAGE_ONLY_HEADS = ("prototype", "linear-probe")  # ties go to the training-free one
CV_SHARE = 0.5  # of the budget left, for the cross-validated comparison of heads


def _small_image_only(backend: Backend, train: LabeledImages, data: FeatureData, cfg: AdvisorConfig, costs: Costs,
                      budget: Budget, m: dict[str, Any], options: dict[str, Any]) -> Advice:
    """Small data on a model without a text tower: how well frozen features separate the classes is all
    that measures the domain gap (a frozen probe, cross-validated on the training images)."""
    shots = min(train.counts().values())
    if shots < 2:
        m["frozen probe accuracy (cross-validated)"] = "not measured: one image per class, nothing to cross-validate"
        return _choose(["prototype", "linear-probe"], backend, costs, budget, m,
                       "small data, one image per class, no text tower: nothing can be cross-validated and one "
                       "image is too little to train on; nearest class mean on the frozen features (SimpleShot), "
                       "training-free")
    probe = LinearProbe.fit_features(backend, train.classes, data,
                                     LinearProbeConfig(seed=options.get("seed", 0)))
    probe_acc = probe.selection["cross-validation accuracy"][f"{probe.c:g}"]
    m["frozen probe accuracy (cross-validated)"] = probe_acc
    separable = probe_acc >= cfg.separable_probe
    m["domain"] = "similar (frozen features separate the classes)" if separable else "different"
    if separable:
        advice = _choose(["linear-probe", "prototype"], backend, costs, budget, m,
                         f"small data ({shots} image(s) per class) whose frozen features already separate the "
                         f"classes (frozen probe {probe_acc:.2f} in cross-validation): keep the backbone frozen and "
                         "put a new head on its features")
        return _cross_validated_head(backend, train, data, advice, budget, options, IMAGE_ONLY_HEADS)
    return _choose(["partial-ft", "lora", "linear-probe"], backend, costs, budget, m,
                   f"small data ({shots} image(s) per class) that frozen features separate only to {probe_acc:.2f} "
                   "(cross-validated probe): a domain further from the pretraining data; keep the early stages "
                   "frozen and fine-tune the last ones with the head (partial fine-tuning)")


def _cross_validated_head(backend: Backend, train: LabeledImages, data: FeatureData, advice: Advice, budget: Budget,
                          options: dict[str, Any], candidates: tuple[str, ...] = HEADS) -> Advice:
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
    heads = [h for h in candidates if h == "zero-shot" or (get_adapter(h).unsupported(backend) is None and (
        h == advice.method or h in ("linear-probe", "tip-adapter", "prototype")))]
    start, cap = budget.elapsed(), budget.remaining() * CV_SHARE
    everything = torch.arange(len(targets))

    def fold_accuracy(head: str, held: torch.Tensor, seconds: float) -> float:
        if head == "zero-shot":
            logits = data.logit_scale * data.train[held] @ data.text.T
        else:
            cls = get_adapter(head)
            fields = cls.config_class.fields()
            config = cls.config_class().with_options(**{k: v for k, v in options.items() if k in fields})
            keep = torch.ones(len(targets), dtype=torch.bool)
            keep[held] = False
            part = train.subset(everything[keep].tolist())
            adapter = cls.fit(backend, part, part, config, budget=Budget(seconds, clock=budget.clock))
            logits = adapter.logits_from_features(data.train[held])
        return float((logits.float().argmax(-1) == targets[held]).float().mean())

    per_fold: dict[str, list[tuple[float]]] = {}
    skipped = []
    plan_log.disabled = True  # the per-fold fits' plans would drown the advisor's own lines
    try:
        for n, head in enumerate(heads):
            spent = budget.elapsed() - start
            if head != "zero-shot" and spent >= cap:
                skipped = heads[n:]
                break
            fits_left = (len(heads) - n) * len(folds)
            per_fold[head] = [(fold_accuracy(head, held, (cap - spent) / fits_left),) for held in folds]
    finally:
        plan_log.disabled = False
    tried = [h for h in heads if h in per_fold]
    best = one_standard_error(tried, per_fold)
    m = dict(advice.measurements)
    for head in tried:
        m[f"{head} accuracy (cross-validated)"] = round(sum(s[0] for s in per_fold[head]) / len(folds), 4)
    for head in skipped:
        m[f"{head} accuracy (cross-validated)"] = "not measured: the budget's share for it was spent"
    simplest = "closest to zero-shot" if "zero-shot" in heads else "simplest"
    how = (f"{advice.reason}; by {len(folds)}-fold cross-validation on the training images, the head {simplest} "
           f"within one standard error of the best: {best}")
    method = "linear-probe" if best == "zero-shot" else best  # the probe without a C is the zero-shot classifier
    return Advice(method, how, m, advice.compute, options={"c_grid": ()} if best == "zero-shot" else {})


def _choose(ranked: list[str], backend: Backend, costs: Costs, budget: Budget, m: dict[str, Any],
            reason: str) -> Advice:
    """The first method of `ranked` that works on this model and whose default schedule fits the budget."""
    skipped: list[tuple[str, str]] = []  # (method, why not)
    runnable: list[tuple[float, str]] = []
    for method in ranked:
        cls = get_adapter(method)
        why_not = cls.unsupported(backend)
        if why_not is not None:
            skipped.append((method, f"{method} {why_not}"))
            continue
        seconds = cls.default_seconds(costs)
        m[f"{method} default schedule (estimated)"] = format_seconds(seconds)
        runnable.append((seconds, method))
        if seconds <= budget.remaining():
            break
        skipped.append((method, f"{method}'s default schedule (about {format_seconds(seconds)} here) does not "
                                 f"fit the {format_seconds(budget.remaining())} left of the budget"))
    if not runnable:
        raise AdapterError(f"no method of {', '.join(ranked)} can run on {backend.spec!r}: "
                           f"{'; '.join(why for _, why in skipped)}")
    fits = runnable[-1][0] <= budget.remaining()
    method = runnable[-1][1] if fits else min(runnable)[1]
    compute = ""
    if method != ranked[0]:
        compute = "; ".join(why for name, why in skipped if name != method)
        compute += f": chose {method} instead" if fits else (
            f"; none fits: chose the cheapest, {method}, and cut its schedule to the budget")
    return Advice(method, reason, m, compute)


def _done(advice: Advice) -> Advice:
    for line in advice.lines():  # before the chosen method's long work starts
        plan_log.info("advisor: %s", line.strip())
    return advice
