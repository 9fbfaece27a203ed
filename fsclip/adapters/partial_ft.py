"""Partial fine-tuning: the last N blocks (or CNN stages) of the image tower, its projection head and a classifier.

The playbook's answer for small data from a moderately different domain: early layers (general
features) stay frozen, the task-level top of the network adapts.
"""

from __future__ import annotations

from dataclasses import dataclass

from fsclip.adapters._finetune import FineTuneAdapter, FineTuneConfig
from fsclip.adapters.config import check_field
from fsclip.adapters.registry import register_adapter
from fsclip.errors import AdapterError

__all__ = ["PartialFineTune", "PartialFineTuneConfig"]


@dataclass(frozen=True)
class PartialFineTuneConfig(FineTuneConfig):
    """Options of partial fine-tuning (besides the fine-tuning options).

    Attributes:
        blocks: how many of the last blocks of the image tower to unfreeze (transformer blocks, or a
            CNN's stages).
    """

    blocks: int = 2

    def __post_init__(self):
        super().__post_init__()
        check_field(isinstance(self.blocks, int) and self.blocks >= 1, "blocks", self.blocks, "an integer >= 1")


class PartialFineTune(FineTuneAdapter):
    name = "partial-ft"
    config_class = PartialFineTuneConfig

    @classmethod
    def blocks_to_train(cls, config: PartialFineTuneConfig, n_blocks: int) -> int:
        if config.blocks > n_blocks:
            raise AdapterError(f"blocks={config.blocks} but the image tower has {n_blocks}; choose 1..{n_blocks} "
                               "(or method full-ft to train them all)")
        return config.blocks

    @classmethod
    def trains_stem(cls, config: PartialFineTuneConfig, n_blocks: int) -> bool:
        return False  # the patch and position embeddings are the most general layers of all


register_adapter(PartialFineTune)
