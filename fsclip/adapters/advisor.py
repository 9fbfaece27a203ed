"""The strategy advisor behind `method="auto"`: the transfer-learning strategy matrix, measured.

    |                  | similar domain                      | different domain                  |
    | small data       | frozen features: Tip-Adapter (<= 4  | LoRA in the attention layers     |
    |                  | shots/class) or a linear probe      | (partial fine-tuning w/o attention)|
    | medium data      | partial fine-tuning (last blocks + head)                                |
    | large data       | full fine-tuning at a low learning rate, discriminative rates          |

Size is counted (training images, images per class). Similarity is measured on the validation split:
zero-shot accuracy above chance (can the model already name these classes?), and how well a frozen
probe on the model's features does (does it at least tell them apart?). Small data from a different
domain whose frozen features already separate the classes still gets a linear probe: a heavier
method would only add variance.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fsclip.adapters._features import FeatureData, encode_items
from fsclip.adapters.config import check_field
from fsclip.adapters.linear_probe import LinearProbe, LinearProbeConfig
from fsclip.backends import Backend
from fsclip.data import LabeledImages
from fsclip.prompts_io import load_templates
from fsclip.zeroshot import build_text_classifier

__all__ = ["Advice", "AdvisorConfig", "advise"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdvisorConfig:
    """Thresholds of the strategy matrix.

    Attributes:
        small_images: fewer training images than this is small data (the playbook's ~1,000).
        large_images: at least this many is large data.
        similar_zero_shot: zero-shot validation accuracy above chance, as a fraction of the way from
            chance (0) to perfect (1), at or above which the domain counts as similar.
        separable_probe: frozen-probe validation accuracy at or above which the frozen features are
            good enough even for a different domain.
        tiny_shots: at most this many images per class favours the training-free Tip-Adapter.
    """

    small_images: int = 1000
    large_images: int = 10000
    similar_zero_shot: float = 0.6
    separable_probe: float = 0.95
    tiny_shots: int = 4

    def __post_init__(self):
        check_field(0 < self.small_images <= self.large_images, "small_images", self.small_images,
                    f"> 0 and <= large_images ({self.large_images})")
        check_field(0 <= self.similar_zero_shot <= 1, "similar_zero_shot", self.similar_zero_shot, "in [0, 1]")
        check_field(0 <= self.separable_probe <= 1, "separable_probe", self.separable_probe, "in [0, 1]")
        check_field(self.tiny_shots >= 1, "tiny_shots", self.tiny_shots, ">= 1")


@dataclass(frozen=True)
class Advice:
    method: str
    reason: str
    measurements: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """Readable report: one line per measurement, then the choice and why."""
        out = [f"  {k:<28} {v:.3f}" if isinstance(v, float) else f"  {k:<28} {v}" for k, v in self.measurements.items()]
        return ["measurements:", *out, f"method: {self.method}", f"reason: {self.reason}"]


def advise(backend: Backend, train: LabeledImages, val: LabeledImages, templates="imagenet80",
           config: AdvisorConfig | None = None, progress: bool = False) -> Advice:
    """Measure data size and domain similarity, and pick a method from the strategy matrix."""
    cfg = config or AdvisorConfig()
    counts = train.counts()
    n_train, n_cls, shots = len(train), len(train.classes), min(counts.values())
    chance = 1.0 / n_cls
    m: dict[str, Any] = {"classes": n_cls, "training images": n_train, "images per class (min)": shots,
                         "validation images": len(val)}
    size = "large" if n_train >= cfg.large_images else "medium" if n_train >= cfg.small_images else "small"
    m["data size"] = size

    tmpl = load_templates(templates)
    if size == "small":  # frozen features are cheap here, and the probe needs them anyway
        data = FeatureData.build(backend, train, val, tmpl, progress=progress)
        val_features, text, scale = data.val, data.text, data.logit_scale
    else:
        val_features = encode_items(backend, val.paths, progress=progress, what="validation image")
        text, scale = build_text_classifier(backend, train.classes, tmpl).float().cpu(), backend.logit_scale
    zs_acc = float(((scale * val_features @ text.T).argmax(-1) == _targets(val)).float().mean())
    above = (zs_acc - chance) / (1 - chance)
    similar = above >= cfg.similar_zero_shot
    m["zero-shot val accuracy"] = zs_acc
    m["chance accuracy"] = chance
    m["zero-shot above chance"] = above
    m["domain"] = "similar" if similar else "different"

    if size == "large":
        return _done("full-ft", m, f"large data ({n_train} >= {cfg.large_images} images): fine-tune the whole "
                     "image tower from the pretrained weights at a low learning rate, earlier layers lowest")
    if size == "medium":
        return _done("partial-ft", m, f"medium data ({cfg.small_images} <= {n_train} < {cfg.large_images} images): "
                     "keep the early layers frozen and fine-tune the last blocks and the head")
    if similar:
        if shots <= cfg.tiny_shots:
            return _done("tip-adapter", m, f"small data ({shots} image(s) per class) from a similar domain (zero-shot "
                         f"{above:.2f} of the way from chance to perfect): keep the backbone frozen; a training-free "
                         "feature cache on top of zero-shot")
        return _done("linear-probe", m, f"small data ({n_train} images) from a similar domain (zero-shot {above:.2f} "
                     "of the way from chance to perfect): keep the backbone frozen, train a linear head")
    probe = LinearProbe.fit_features(backend, train.classes, data, LinearProbeConfig(templates=tmpl))
    probe_acc = float((probe.logits_from_features(data.val).argmax(-1) == data.val_targets).float().mean())
    m["frozen probe val accuracy"] = probe_acc
    if probe_acc >= cfg.separable_probe:
        return _done("linear-probe", m, f"small data from a different domain (zero-shot {above:.2f} of the way from "
                     f"chance), but a frozen probe already reaches {probe_acc:.2f} on validation: the features "
                     "separate the classes, a linear head is enough")
    method = "lora" if _has_attention(backend) else "partial-ft"
    what = "low-rank adapters in the attention layers (LoRA)" if method == "lora" else "the last blocks and the head"
    return _done(method, m, f"small data from a different domain (zero-shot {above:.2f} of the way from chance, "
                 f"frozen probe {probe_acc:.2f}): keep the early layers' weights and adapt {what}")


def _targets(data: LabeledImages) -> torch.Tensor:
    return torch.tensor(data.targets, dtype=torch.long)


def _has_attention(backend: Backend) -> bool:
    suffixes = tuple(backend.attention_target_modules())
    return any(n.rsplit(".", 1)[-1] in suffixes for n, _ in backend.model.named_modules())


def _done(method: str, measurements: dict[str, Any], reason: str) -> Advice:
    advice = Advice(method, reason, measurements)
    for line in advice.lines():
        logger.info("advisor: %s", line.strip())
    return advice
