"""The shapes world: a procedural image-caption domain, and the tiny CLIP trained on it.

It stands in for web-scale pretraining where no pretrained weights can be downloaded: colours and
shapes give real, testable semantics (zero-shot on unseen colour x shape combinations, and novel
shapes held out of pretraining entirely for few-shot adaptation).
"""

from fsclip.shapes.world import (
    BASE_SHAPES,
    COLOURS,
    NOVEL_SHAPES,
    PRETRAIN_SHAPES,
    heldout_combos,
    render,
    seen_combos,
    write_folder,
)

__all__ = ["BASE_SHAPES", "COLOURS", "NOVEL_SHAPES", "PRETRAIN_SHAPES", "heldout_combos", "render", "seen_combos", "write_folder"]
