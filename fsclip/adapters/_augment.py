"""Training-time image augmentation on PIL images, driven by an explicit RNG so runs and caches repeat.

Geometry only (random resized crop, horizontal flip): the model's own `preprocess` runs afterwards, so
resolution, crop and normalisation still match what the model was pretrained with. Drawing a view
(`draw_view`) is apart from making it (`make_view`): data-parallel ranks draw every view of a global
batch, in order, and each makes only its own part.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageOps

__all__ = ["View", "draw_view", "make_view", "random_view"]

View = tuple[tuple[int, int, int, int], bool]  # (crop box, mirrored)


def draw_view(
    rng: np.random.Generator, width: int, height: int, scale: float = 0.5, flip: bool = True,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> View:
    """The random draws of torchvision's RandomResizedCrop(scale=(scale, 1), ratio) and an optional flip."""
    box = (0, 0, width, height)
    if scale < 1.0:
        for _ in range(10):
            area = width * height * rng.uniform(scale, 1.0)
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= width and 0 < ch <= height:
                x, y = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
                box = (x, y, x + cw, y + ch)
                break
    return box, bool(flip and rng.random() < 0.5)


def make_view(img: Image.Image, view: View, size: int) -> Image.Image:
    """The drawn crop of `img`, resized to `size` x `size` (bicubic), mirrored if drawn so."""
    box, mirrored = view
    out = img.resize((size, size), Image.BICUBIC, box=box)
    return ImageOps.mirror(out) if mirrored else out


def random_view(
    img: Image.Image, rng: np.random.Generator, size: int, scale: float = 0.5, flip: bool = True,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """torchvision's RandomResizedCrop(size, scale=(scale, 1), ratio) then an optional horizontal flip."""
    return make_view(img, draw_view(rng, *img.size, scale, flip, ratio), size)
