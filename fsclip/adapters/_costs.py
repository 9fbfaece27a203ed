"""What a fit will cost on this device, measured before it starts: the advisor's and the budget's input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fsclip.adapters._augment import random_view
from fsclip.adapters._budget import Budget
from fsclip.adapters._features import load_images_or_fail
from fsclip.backends import Backend
from fsclip.data import LabeledImages
from fsclip.distributed import world

__all__ = ["Costs", "measure_costs"]


@dataclass(frozen=True)
class Costs:
    """What the advisor knows before fitting: the data's size and this device's measured forward times."""

    images: int
    shots: int  # training images in the smallest class
    classes: int
    image_seconds: float  # one image read, augmented and through the image tower, no gradients
    text_seconds: float  # one prompt through the text tower, no gradients

    def train_step(self, images: int, prompts: int) -> float:
        """A training step through both towers: forward and backward cost about three forwards."""
        return 3 * (images * self.image_seconds + prompts * self.text_seconds)


@torch.inference_mode()
def measure_costs(backend: Backend, train: LabeledImages, budget: Budget, probe_images: int = 4) -> Costs:
    """Seconds per image and per prompt through the towers, timed on this device (second of two runs).

    An image's cost includes reading it and making an augmented, preprocessed view of it: for small
    models that, not the forward pass, is most of the time. Under a launcher, rank 0's times.
    """
    t0 = budget.clock()
    rng = np.random.default_rng(0)
    for img in load_images_or_fail(train.paths[:probe_images]):
        backend.preprocess(random_view(img, rng, backend.image_size))
    prepare = (budget.clock() - t0) / min(probe_images, len(train))
    backend.model.eval()
    size = backend.image_size
    pixels = torch.zeros(probe_images, 3, size, size, device=backend.device, dtype=backend.dtype)
    has_text = getattr(backend, "has_text", True)  # image-only backbones have no prompts to time
    prompts = [f"a photo of a {c}." for c in train.classes[:probe_images]]
    inputs = {k: v.to(backend.device) for k, v in backend.tokenize(prompts).items()} if has_text else {}
    image_s, text_s = [], []
    for _ in range(2):
        t0 = budget.clock()
        backend.forward_images(pixels).float().cpu()
        t1 = budget.clock()
        if has_text:
            backend.forward_texts(inputs).float().cpu()
        image_s.append((t1 - t0) / probe_images)
        text_s.append((budget.clock() - t1) / len(prompts))
    shots = min(train.counts().values())
    return world.broadcast(Costs(images=len(train), shots=shots, classes=len(train.classes),
                                 image_seconds=prepare + image_s[-1], text_seconds=text_s[-1]))
