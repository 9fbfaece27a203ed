"""Full fine-tuning of the image tower with discriminative learning rates.

The playbook's answer for large data, or a domain far from the pretraining photos: every layer
adapts, starting from the pretrained weights, at a learning rate 10-100x below training from scratch
(1e-5 here), lowest for the earliest layers, and unfrozen gradually from the top down (ULMFiT, Howard &
Ruder 2018): the first epoch trains the heads only, each further epoch one more block, so the early,
most general layers stay frozen longest.
"""

from __future__ import annotations

from dataclasses import dataclass

from fsclip.adapters._finetune import FineTuneAdapter, FineTuneConfig
from fsclip.adapters.registry import register_adapter

__all__ = ["FullFineTune", "FullFineTuneConfig"]


@dataclass(frozen=True)
class FullFineTuneConfig(FineTuneConfig):
    lr: float = 1e-5
    layer_decay: float = 0.8
    gradual_unfreeze: bool = True


class FullFineTune(FineTuneAdapter):
    name = "full-ft"
    config_class = FullFineTuneConfig

    @classmethod
    def blocks_to_train(cls, config: FullFineTuneConfig, n_blocks: int) -> int:
        return n_blocks


register_adapter(FullFineTune)
