"""Shapes-world evaluation sets, generated (deterministically, offline) under the data root on first use.

- `shapes-compositional`: zero-shot over all 48 colour x shape names; the 8 combinations whose colour and
  shape were never named together in a pretraining caption form the group "held-out combinations".
- `shapes-novel`: the 9 shapes (any colour), train/val/test; diamond, crescent and ring were never seen
  in pretraining (group "novel shapes"), so zero-shot fails there and few-shot has to learn them.
- `shapes-captions`: one image per colour x shape with 5 captions each, for retrieval.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np

from fsclip.evaluation.captions import read_captions
from fsclip.evaluation.datasets import DatasetSpec, register_dataset
from fsclip.evaluation.imagefolder import METADATA, load_split_folders
from fsclip.shapes.world import (
    BASE_SHAPES,
    COLOURS,
    NOVEL_SHAPES,
    caption,
    heldout_combos,
    render,
    seen_combos,
    write_folder,
)

__all__ = ["write_captions", "write_compositional", "write_novel"]


def write_compositional(folder: Path, per_class: int = 5, seed: int = 11) -> None:
    """`folder/test/<colour shape>/` for all 48 combinations, plus the group of held-out ones."""
    combos = sorted(seen_combos() + heldout_combos())
    write_folder(folder / "test", {f"{c} {s}": [(c, s)] for c, s in combos}, per_class, seed=seed)
    held = sorted(f"{c} {s}" for c, s in heldout_combos())
    (folder / METADATA).write_text(json.dumps({"templates": "shapes", "groups": {"held-out combinations": held}}))


def write_novel(folder: Path, train: int = 32, val: int = 8, test: int = 20, seed: int = 12) -> None:
    """`folder/{train,val,test}/<shape>/` for the 6 base and 3 novel shapes, each in random colours."""
    classes = {s: [(c, s) for c in COLOURS] for s in BASE_SHAPES + NOVEL_SHAPES}
    for n, (split, count) in enumerate((("train", train), ("val", val), ("test", test))):
        write_folder(folder / split, classes, count, seed=seed + n)
    (folder / METADATA).write_text(json.dumps({"templates": "shapes", "groups": {"novel shapes": list(NOVEL_SHAPES)}}))


def write_captions(folder: Path, captions: int = 5, seed: int = 13) -> None:
    """`folder/images/*.png`, one per colour x shape, and `folder/captions.json` (Karpathy format)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    images = []
    for i, (c, s) in enumerate(sorted(seen_combos() + heldout_combos())):
        name = f"{i:03d}_{c}_{s}.png"
        render(c, s, rng).save(folder / "images" / name)
        caps: list[str] = []
        for _ in range(50):  # distinct phrasings where the world has enough
            cap = caption(c, s, rng)
            if cap not in caps:
                caps.append(cap)
            if len(caps) == captions:
                break
        images.append({"filename": name, "split": "test", "sentences": [{"raw": t} for t in caps]})
    (folder / "captions.json").write_text(json.dumps({"dataset": "shapes", "images": images}, indent=1))


register_dataset(DatasetSpec(
    "shapes-compositional", "classification", partial(load_split_folders, name="shapes-compositional"),
    folder="shapes-compositional", templates="shapes", generate=write_compositional,
    description="synthetic: 48 colour x shape classes, zero-shot on 8 combinations never named together in pretraining",
))
register_dataset(DatasetSpec(
    "shapes-novel", "classification", partial(load_split_folders, name="shapes-novel"),
    folder="shapes-novel", templates="shapes", generate=write_novel,
    description="synthetic: 9 shapes, 3 of them (diamond, crescent, ring) never seen in pretraining",
))
register_dataset(DatasetSpec(
    "shapes-captions", "retrieval",
    lambda folder: read_captions(folder / "captions.json", [folder / "images"], "shapes-captions"),
    folder="shapes-captions", generate=write_captions,
    description="synthetic: 48 images of colour x shape combinations, 5 captions each",
))
