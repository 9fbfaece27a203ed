"""Accuracy gates: an exported runtime is used only if it agrees with torch on a calibration batch.

fp32 must reproduce torch's normalised features within `FP32_MAX_ABS`; int8 must keep every feature's
cosine to torch's at or above `INT8_MIN_COSINE` and agree with torch's zero-shot top-1 on at least
`INT8_MIN_AGREEMENT` of the images (both towers quantised, over `gate_labels()`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fsclip.backends.base import Backend
from fsclip.images import IMAGE_EXTENSIONS, ImageLoadError, load_image

__all__ = [
    "CALIBRATION_IMAGES",
    "FP32_MAX_ABS",
    "INT8_MIN_AGREEMENT",
    "INT8_MIN_COSINE",
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
TEMPLATE = "a photo of a {}."
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
    """What a gate measured, and whether the runtime passed."""

    runtime: str
    images: int
    texts: int
    calibration: str
    image_max_abs: float
    text_max_abs: float
    image_min_cosine: float
    text_min_cosine: float
    top1_agreement: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GateResult:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def figures(self) -> str:
        """The gate's figures in one line."""
        if self.runtime == "onnx":
            what = (f"max abs difference to torch {self.image_max_abs:.2e} (images), {self.text_max_abs:.2e} "
                    f"(texts), limit {FP32_MAX_ABS:.0e}")
        else:
            what = (f"cosine to torch >= {self.image_min_cosine:.4f} (images), >= {self.text_min_cosine:.4f} "
                    f"(texts), limit {INT8_MIN_COSINE}; zero-shot top-1 agreement "
                    f"{100 * self.top1_agreement:.1f}%, limit {100 * INT8_MIN_AGREEMENT:.0f}%")
        return f"{what}; on {self.calibration} and {self.texts} prompts"


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


def run_gates(reference: Backend, candidate: Backend, runtime: str, pixels: torch.Tensor,
              source: str) -> GateResult:
    """Compare `candidate` (an exported runtime) with `reference` (torch) on `pixels` and the gate prompts."""
    prompts = [TEMPLATE.format(label) for label in gate_labels()]
    ref_img, cand_img = reference.encode_images(pixels), candidate.encode_images(pixels)  # (N, D)
    ref_txt, cand_txt = reference.encode_texts(prompts), candidate.encode_texts(prompts)  # (C, D)
    ref_img, cand_img, ref_txt, cand_txt = (t.float().cpu() for t in (ref_img, cand_img, ref_txt, cand_txt))
    agree = ((ref_img @ ref_txt.T).argmax(1) == (cand_img @ cand_txt.T).argmax(1)).float().mean()  # (N, C) each
    result = dict(
        image_max_abs=float((ref_img - cand_img).abs().max()),
        text_max_abs=float((ref_txt - cand_txt).abs().max()),
        image_min_cosine=float(torch.nn.functional.cosine_similarity(ref_img, cand_img).min()),
        text_min_cosine=float(torch.nn.functional.cosine_similarity(ref_txt, cand_txt).min()),
        top1_agreement=float(agree),
    )
    if runtime == "onnx":
        passed = result["image_max_abs"] <= FP32_MAX_ABS and result["text_max_abs"] <= FP32_MAX_ABS
    else:
        passed = (min(result["image_min_cosine"], result["text_min_cosine"]) >= INT8_MIN_COSINE
                  and result["top1_agreement"] >= INT8_MIN_AGREEMENT)
    gate = GateResult(runtime=runtime, images=len(pixels), texts=len(prompts), calibration=source,
                      passed=bool(passed), **result)
    logger.info("%s gate %s: %s", runtime, "passed" if gate.passed else "failed", gate.figures())
    return gate
