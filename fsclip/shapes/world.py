"""Procedural images of one coloured shape on a noisy background, with captions."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BASE_SHAPES",
    "COLOURS",
    "NOVEL_SHAPES",
    "PRETRAIN_SHAPES",
    "caption",
    "heldout_combos",
    "render",
    "seen_combos",
    "write_folder",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 220),
    "yellow": (235, 215, 35),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
    "white": (248, 248, 248),
    "black": (15, 15, 15),
}
BASE_SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
# Never drawn during pretraining: the classes few-shot adaptation has to learn.
NOVEL_SHAPES = ("diamond", "crescent", "ring")
# Drawn and named in pretraining only, in every colour: web-scale pretraining names far more concepts
# than any task uses, and a model that has told 14 shapes apart learns more general shape features
# (edges, corners, curvature, holes) than one that has only seen the 6 the tasks use.
PRETRAIN_SHAPES = ("pentagon", "octagon", "heart", "arrow", "ellipse", "semicircle", "rectangle", "trapezoid")

_CAPTIONS = (
    "a {c} {s}", "a {c} {s}.", "a photo of a {c} {s}.", "a picture of a {c} {s}.", "a {s} that is {c}.",
    "a drawing of a {c} {s}.", "one {c} {s} on a grey background.", "a small {c} {s}.", "a big {c} {s}.",
    "a photo of the {c} {s}.", "a {c} {s} on noise.", "an image of a {c} {s}.",
)
_SHAPE_ONLY = ("a {s}.", "a photo of a {s}.", "a {s} shape.")
_COLOUR_ONLY = ("something {c}.", "a {c} shape.", "a photo of something {c}.")


def seen_combos() -> list[tuple[str, str]]:
    held = set(heldout_combos())
    return [(c, s) for c in COLOURS for s in BASE_SHAPES if (c, s) not in held]


def heldout_combos() -> list[tuple[str, str]]:
    """One combination per colour, never captioned in pretraining: tests compositional zero-shot."""
    return [(c, BASE_SHAPES[(i + 1) % len(BASE_SHAPES)]) for i, c in enumerate(COLOURS)]


def caption(colour: str | None, shape: str | None, rng: np.random.Generator) -> str:
    if colour and shape:
        return _CAPTIONS[rng.integers(len(_CAPTIONS))].format(c=colour, s=shape)
    if shape:
        return _SHAPE_ONLY[rng.integers(len(_SHAPE_ONLY))].format(s=shape)
    return _COLOUR_ONLY[rng.integers(len(_COLOUR_ONLY))].format(c=colour)


def _regular(n: int, r: float, rot: float, cx: float, cy: float, ratio: float = 1.0) -> list[tuple[float, float]]:
    return [
        (cx + r * ratio * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _rotate(points, rot, cx, cy):
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _draw_mask(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    r = size * rng.uniform(0.2, 0.32)
    margin = r * 1.05
    cx, cy = rng.uniform(margin, size - margin, 2)
    small_rot = rng.uniform(-0.3, 0.3)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=255)
    elif shape == "ring":
        d.ellipse(box, fill=255)
        ri = r * 0.55
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif shape == "crescent":
        d.ellipse(box, fill=255)
        ang = rng.uniform(0, 2 * math.pi)
        ox, oy = cx + 0.45 * r * math.cos(ang), cy + 0.45 * r * math.sin(ang)
        d.ellipse([ox - r * 0.9, oy - r * 0.9, ox + r * 0.9, oy + r * 0.9], fill=0)
    elif shape == "square":
        d.polygon(_regular(4, r * 1.1, math.pi / 4 + small_rot, cx, cy), fill=255)
    elif shape == "diamond":
        pts = [(cx, cy - r), (cx + 0.55 * r, cy), (cx, cy + r), (cx - 0.55 * r, cy)]
        d.polygon(_rotate(pts, small_rot, cx, cy), fill=255)
    elif shape == "pentagon":
        d.polygon(_regular(5, r * 1.05, -math.pi / 2 + small_rot, cx, cy), fill=255)
    elif shape == "octagon":
        d.polygon(_regular(8, r, math.pi / 8 + small_rot, cx, cy), fill=255)
    elif shape in ("ellipse", "rectangle"):
        rot = rng.uniform(0, math.pi)
        if shape == "ellipse":
            pts = [(cx + r * math.cos(t), cy + 0.5 * r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48)]
        else:
            pts = [(cx - r, cy - 0.5 * r), (cx + r, cy - 0.5 * r), (cx + r, cy + 0.5 * r), (cx - r, cy + 0.5 * r)]
        d.polygon(_rotate(pts, rot, cx, cy), fill=255)
    elif shape == "semicircle":
        start = rng.uniform(0, 360)
        d.pieslice([cx - r, cy - r * 0.6, cx + r, cy + r * 1.4], start, start + 180, fill=255)
    elif shape == "trapezoid":
        pts = [(cx - r, cy + 0.6 * r), (cx + r, cy + 0.6 * r), (cx + 0.5 * r, cy - 0.6 * r), (cx - 0.5 * r, cy - 0.6 * r)]
        d.polygon(_rotate(pts, small_rot, cx, cy), fill=255)
    elif shape == "heart":
        pts = [(cx + r * 0.95 * math.sin(t) ** 3,
                cy - r * (0.8 * math.cos(t) - 0.3 * math.cos(2 * t) - 0.12 * math.cos(3 * t) - 0.05 * math.cos(4 * t)))
               for t in np.linspace(0, 2 * math.pi, 48)]
        d.polygon(_rotate(pts, small_rot, cx, cy), fill=255)
    elif shape == "arrow":
        w, h = r * 0.25, r * 0.55
        pts = [(-r, -w), (r - h, -w), (r - h, -h), (r, 0), (r - h, h), (r - h, w), (-r, w)]
        d.polygon(_rotate([(cx + x, cy + y) for x, y in pts], rng.uniform(0, 2 * math.pi), cx, cy), fill=255)
    elif shape == "triangle":
        d.polygon(_regular(3, r * 1.1, -math.pi / 2 + small_rot, cx, cy), fill=255)
    elif shape == "hexagon":
        d.polygon(_regular(6, r, rng.uniform(0, math.pi), cx, cy), fill=255)
    elif shape == "star":
        rot = rng.uniform(0, 2 * math.pi)
        pts = [
            (cx + rr * math.cos(rot + math.pi * k / 5), cy + rr * math.sin(rot + math.pi * k / 5))
            for k, rr in zip(range(10), [r * 1.1, r * 0.45] * 5)
        ]
        d.polygon(pts, fill=255)
    elif shape == "cross":
        w = r * 0.36
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        d.polygon(_rotate([(cx + x, cy + y) for x, y in pts], small_rot, cx, cy), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of: {', '.join(BASE_SHAPES + NOVEL_SHAPES + PRETRAIN_SHAPES)}")
    return mask


def render(colour: str, shape: str, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """One RGB image: a `colour` `shape` of random size, place and rotation on a noisy grey-ish background."""
    hi = size * 2  # draw at 2x and downsample, for anti-aliased edges
    base = rng.uniform(80, 175) + rng.uniform(-18, 18, 3)
    noise = rng.normal(0, rng.uniform(4, 16), (hi, hi, 3))
    bg = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    fill = np.clip(np.array(COLOURS[colour]) + rng.integers(-18, 19, 3), 0, 255)
    fg = Image.new("RGB", (hi, hi), tuple(int(v) for v in fill))
    img.paste(fg, (0, 0), _draw_mask(shape, hi, rng))
    return img.resize((size, size), Image.BILINEAR, reducing_gap=None)


def write_folder(
    root: str | os.PathLike,
    classes: dict[str, list[tuple[str, str]]],
    per_class: int,
    seed: int = 0,
    size: int = 96,
    fmt: str = "png",
) -> list[tuple[Path, str]]:
    """Write an ImageFolder: `root/<class>/<n>.png` for each class, drawing from its (colour, shape) list.

    Returns `(path, class)` pairs. Class folder names use `_` for spaces.
    """
    rng = np.random.default_rng(seed)
    out = []
    for name, combos in classes.items():
        folder = Path(root, name.replace(" ", "_"))
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            colour, shape = combos[rng.integers(len(combos))]
            path = folder / f"{n:04d}.{fmt}"
            render(colour, shape, rng, size).save(path)
            out.append((path, name))
    return out
