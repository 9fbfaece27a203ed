"""Accuracy gates: an exported runtime is used only if it agrees with torch on a calibration batch.

fp32 must reproduce torch's normalised features (and an own head's logits, where the runtime computes
them) within `FP32_MAX_ABS`; int8 must keep every feature's cosine to torch's at or above
`INT8_MIN_COSINE` and agree with torch's top-1 on at least `INT8_MIN_AGREEMENT` of the images. The top-1
is what the model answers: zero-shot over `gate_labels()` for an image-text model (both towers
quantised); the own head's class for an image-only model whose head runs on the runtime's features;
else each image's nearest neighbour (by cosine) among the other calibration images, what search returns
(a neighbour that torch rates within `NEIGHBOUR_TIE` of its own nearest is a tie, and agrees).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image

from fsclip.backends.base import Backend
from fsclip.images import IMAGE_EXTENSIONS, ImageLoadError, load_image

if TYPE_CHECKING:
    from fsclip.runtime.ort_backend import OrtBackend

__all__ = [
    "AGREEMENTS",
    "CALIBRATION_IMAGES",
    "FP32_MAX_ABS",
    "INT8_MIN_AGREEMENT",
    "INT8_MIN_COSINE",
    "NEIGHBOUR_TIE",
    "GateResult",
    "calibration_pixels",
    "gate_labels",
    "run_gates",
]

logger = logging.getLogger(__name__)

CALIBRATION_IMAGES = 32
FP32_MAX_ABS = 1e-4
INT8_MIN_COSINE = 0.99
INT8_MIN_AGREEMENT = 0.99
# Cosine below which two neighbours are a tie: on a tiny random DINOv2 over the 32 renders, the one int8
# swap was between neighbours 1.3e-5 apart in torch (median gap between the two nearest: 2e-3).
NEIGHBOUR_TIE = 1e-3
TEMPLATE = "a photo of a {}."
# What `top1_agreement` compares, by kind.
AGREEMENTS = {"zero-shot": "zero-shot top-1 agreement", "own-head": "own-head top-1 agreement",
              "neighbour": "nearest-neighbour agreement"}
# Everyday photo subjects, for zero-shot agreement on the user's own images.
EVERYDAY = (
    "dog", "cat", "bird", "horse", "cow", "fish", "insect", "person", "child", "group of people", "face",
    "car", "bicycle", "motorcycle", "bus", "train", "boat", "airplane", "truck", "road", "bridge", "building",
    "house", "church", "street", "city skyline", "room", "kitchen", "bedroom", "office", "shop", "restaurant",
    "table", "chair", "sofa", "bed", "computer", "phone", "book", "bottle", "cup", "plate of food", "cake",
    "fruit", "vegetables", "flower", "tree", "forest", "garden", "field", "mountain", "beach", "sea", "lake",
    "river", "waterfall", "desert", "snow", "sky", "sunset", "night", "document", "screenshot", "painting",
    "drawing", "toy", "clothes", "shoes", "sports game", "concert", "wedding", "party", "map", "logo",
)


def gate_labels() -> list[str]:
    """The gate's zero-shot vocabulary: everyday subjects, and the shapes world's 48 colour x shape classes."""
    from fsclip.shapes import BASE_SHAPES, COLOURS

    return [*EVERYDAY, *(f"{c} {s}" for c in COLOURS for s in BASE_SHAPES)]


@dataclass(frozen=True)
class GateResult:
    """What a gate measured, and whether the runtime passed. Text and head figures are None where the
    model has no text tower, or its head is not run by the runtime."""

    runtime: str
    images: int
    texts: int
    calibration: str
    image_max_abs: float
    text_max_abs: float | None
    head_max_abs: float | None
    image_min_cosine: float
    text_min_cosine: float | None
    agreement: Literal["zero-shot", "own-head", "neighbour"]
    top1_agreement: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GateResult:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def _checks(self) -> list[tuple[str, bool]]:
        """(figure, within its limit) for each figure this runtime is gated on."""
        if self.runtime == "onnx":
            named = [("image", self.image_max_abs), ("text", self.text_max_abs), ("own-head logit", self.head_max_abs)]
            return [(f"{what} max abs difference", v <= FP32_MAX_ABS) for what, v in named if v is not None]
        named = [("image", self.image_min_cosine), ("text", self.text_min_cosine)]
        return ([(f"{what} cosine", v >= INT8_MIN_COSINE) for what, v in named if v is not None]
                + [(AGREEMENTS[self.agreement], self.top1_agreement >= INT8_MIN_AGREEMENT)])

    def failed(self) -> list[str]:
        """The figures outside their limits (none when passed)."""
        return [what for what, ok in self._checks() if not ok]

    def figures(self) -> str:
        """The gate's figures in one line."""
        if self.runtime == "onnx":
            named = [("images", self.image_max_abs), ("texts", self.text_max_abs),
                     ("own-head logits", self.head_max_abs)]
            what = (f"max abs difference to torch {', '.join(f'{v:.2e} ({k})' for k, v in named if v is not None)}"
                    f", limit {FP32_MAX_ABS:.0e}")
        else:
            named = [("images", self.image_min_cosine), ("texts", self.text_min_cosine)]
            what = (f"cosine to torch {', '.join(f'>= {v:.4f} ({k})' for k, v in named if v is not None)}, "
                    f"limit {INT8_MIN_COSINE}; {AGREEMENTS[self.agreement]} {100 * self.top1_agreement:.1f}%, "
                    f"limit {100 * INT8_MIN_AGREEMENT:.0f}%")
        return f"{what}; on {self.calibration}" + (f" and {self.texts} prompts" if self.texts else "")


def _walk(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(folder, name)


def _expand(items: Iterable) -> Iterator[Path | Image.Image]:
    for item in items:
        if isinstance(item, Image.Image):
            yield item
        elif (path := Path(item).expanduser()).is_dir():
            yield from _walk(path)
        else:
            yield path


def _shapes_renders(n: int, seed: int = 0) -> list[Image.Image]:
    """Images of the shapes world's zero-shot task (every colour x base shape, in turn)."""
    from fsclip.shapes import BASE_SHAPES, COLOURS, render

    rng = np.random.default_rng(seed)
    combos = [(c, s) for c in COLOURS for s in BASE_SHAPES]
    return [render(*combos[(7 * i) % len(combos)], rng) for i in range(n)]


def calibration_pixels(backend: Backend, items: Iterable | None = None,
                       n: int = CALIBRATION_IMAGES) -> tuple[torch.Tensor, str]:
    """(n, 3, H, W) pixels: the first readable images of `items` (files, folders walked lazily, PIL images),
    topped up with shapes-world renders; and a description of where they came from."""
    pixels: list[torch.Tensor] = []
    tried = 0
    for item in _expand(items or ()):
        if len(pixels) >= n or tried >= 4 * n:  # a folder of broken files must not stall the load
            break
        tried += 1
        try:
            img = item if isinstance(item, Image.Image) else load_image(item, draft_size=backend.image_size)
        except ImageLoadError:
            continue
        pixels.append(backend.preprocess(img.convert("RGB")))
    own = len(pixels)
    pixels += [backend.preprocess(img) for img in _shapes_renders(n - own)]
    if own == n:
        source = f"{n} of your images"
    elif own:
        source = f"{own} of your images + {n - own} shapes-world renders"
    else:
        source = f"{n} shapes-world renders"
    return torch.stack(pixels), source


def run_gates(reference: Backend, candidate: OrtBackend, runtime: str, pixels: torch.Tensor,
              source: str) -> GateResult:
    """Compare `candidate` (an exported runtime) with `reference` (torch) on `pixels` (and the gate prompts,
    for an image-text model)."""
    cosine = torch.nn.functional.cosine_similarity
    ref_img, cand_img = (t.float().cpu() for t in (reference.encode_images(pixels), candidate.encode_images(pixels)))
    result = dict(image_max_abs=float((ref_img - cand_img).abs().max()),
                  image_min_cosine=float(cosine(ref_img, cand_img).min()),
                  text_max_abs=None, text_min_cosine=None, head_max_abs=None)
    prompts = [TEMPLATE.format(label) for label in gate_labels()] if reference.has_text else []
    if prompts:
        ref_txt, cand_txt = (t.float().cpu() for t in (reference.encode_texts(prompts), candidate.encode_texts(prompts)))
        result.update(text_max_abs=float((ref_txt - cand_txt).abs().max()),
                      text_min_cosine=float(cosine(ref_txt, cand_txt).min()))
        agreement, agree = "zero-shot", (ref_img @ ref_txt.T).argmax(1) == (cand_img @ cand_txt.T).argmax(1)
    elif candidate.own_head_in_runtime:
        ref_logits, cand_logits = reference.encode_own_head(pixels).cpu(), candidate.encode_own_head(pixels).cpu()
        result.update(head_max_abs=float((ref_logits - cand_logits).abs().max()))
        agreement, agree = "own-head", ref_logits.argmax(1) == cand_logits.argmax(1)
    else:  # a head that runs in torch agrees with itself; what the runtime changes is the feature space
        agreement, agree = "neighbour", _same_neighbour(ref_img, cand_img)
    gate = GateResult(runtime=runtime, images=len(pixels), texts=len(prompts), calibration=source,
                      agreement=agreement, top1_agreement=float(agree.float().mean()), passed=False, **result)
    gate = replace(gate, passed=not gate.failed())
    logger.info("%s gate %s: %s", runtime, "passed" if gate.passed else "failed", gate.figures())
    return gate


def _same_neighbour(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """(N, D) normalised features of the same images -> (N,) bool: the candidate's nearest other image is
    the reference's nearest, or one the reference rates as similar within `NEIGHBOUR_TIE`."""
    ref_sim, cand_sim = reference @ reference.T, candidate @ candidate.T  # (N, D) @ (D, N) -> (N, N)
    ref_sim.fill_diagonal_(-torch.inf)
    cand_sim.fill_diagonal_(-torch.inf)
    chosen = ref_sim.gather(1, cand_sim.argmax(1, keepdim=True)).squeeze(1)
    return chosen >= ref_sim.max(1).values - NEIGHBOUR_TIE
