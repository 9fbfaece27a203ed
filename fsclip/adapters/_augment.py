"""Training-time image augmentation on PIL images, driven by an explicit RNG so runs and caches repeat.

Geometry only (random resized crop, horizontal flip): the model's own `preprocess` runs afterwards, so
resolution, crop and normalisation still match what the model was pretrained with.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageOps

__all__ = ["random_view"]


def random_view(
    img: Image.Image, rng: np.random.Generator, size: int, scale: float = 0.5, flip: bool = True,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """torchvision's RandomResizedCrop(size, scale=(scale, 1), ratio) then an optional horizontal flip."""
    w, h = img.size
    box = (0, 0, w, h)
    if scale < 1.0:
        for _ in range(10):
            area = w * h * rng.uniform(scale, 1.0)
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                box = (x, y, x + cw, y + ch)
                break
    out = img.resize((size, size), Image.BICUBIC, box=box)
    if flip and rng.random() < 0.5:
        out = ImageOps.mirror(out)
    return out
