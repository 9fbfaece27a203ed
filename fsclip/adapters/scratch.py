"""Training from scratch: the same architecture, randomly initialised, on the same data and budget.

The playbook's test of transfer: if the pretrained model neither converges faster nor ends better
than this, the domain is too far from the pretraining data for this backbone (`fsclip fit
--compare-scratch` runs both and reports both curves). The image tower is re-initialised as its
library initialises a new model (`Backend.reset_weights`: timm's and transformers' own schemes),
then trained whole under a new linear head with the augmentation, batch size and schedule machinery
of fine-tuning, at the learning rate of training from scratch (AdamW 1e-3, the playbook's 10-100x above
full fine-tuning's 1e-5, weight decay 0.05). Batch norm trains on batch statistics, since an untrained
network has no statistics to keep. 100 epochs by default, cut to the compute budget.

The head reads the L2-normalised features times sqrt(D): a randomly initialised linear layer on unit
vectors would start with logits near 0 whatever the features, and need many steps just to grow its
weights; sqrt(D) gives the features the magnitude of a normalised layer's output, as the head of a
network trained from scratch sees them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import nn

from fsclip.adapters._finetune import FineTuneAdapter, FineTuneConfig
from fsclip.adapters._train import trainable_copy
from fsclip.adapters.registry import register_adapter
from fsclip.backends import Backend
from fsclip.data import LabeledImages

__all__ = ["Scratch", "ScratchConfig"]

DEFAULT_EPOCHS = 100


@dataclass(frozen=True)
class ScratchConfig(FineTuneConfig):
    """Options of training from scratch: fine-tuning's, with a from-scratch learning rate applied to every
    layer alike (`layer_decay` 1), nothing to unfreeze gradually and no probe to start from."""

    lr: float = 1e-3
    head_lr: float = 1e-3
    layer_decay: float = 1.0
    weight_decay: float = 0.05
    probe_init: bool = False
    batch_norm: Literal["frozen", "train"] = "train"


class Scratch(FineTuneAdapter):
    name = "scratch"
    config_class = ScratchConfig
    default_epochs = DEFAULT_EPOCHS

    @classmethod
    def blocks_to_train(cls, config: ScratchConfig, n_blocks: int) -> int:
        return n_blocks

    @classmethod
    def starting_point(cls, backend: Backend, train: LabeledImages, val: LabeledImages, config: ScratchConfig,
                       selection: dict) -> tuple[Backend, nn.Linear, float]:
        """A randomly initialised copy (seeded by `config.seed` through `fit`) and a new head."""
        own = trainable_copy(backend)
        own.reset_weights()
        selection["initialisation"] = "random (the architecture's own scheme), no pretrained weights"
        return own, nn.Linear(own.embed_dim, len(train.classes)), math.sqrt(own.embed_dim)


register_adapter(Scratch)
