"""Image encoding over files, folders and PIL images, with decoding overlapped with model compute."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm.auto import tqdm

from fsclip.backends import Backend
from fsclip.images import iter_batches

__all__ = ["EncodedBatch", "encode_images", "iter_encoded"]

Item = str | os.PathLike | Image.Image


@dataclass
class EncodedBatch:
    indices: list[int]  # positions in the input sequence
    features: torch.Tensor  # (len(indices), D), normalised, float32, on the model's device
    errors: list[tuple[int, str]]


def iter_encoded(
    backend: Backend,
    items: Sequence[Item],
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = False,
    draft: bool = True,
    encode: Callable[..., torch.Tensor] | None = None,
    warn: bool = True,
) -> Iterator[EncodedBatch]:
    """Encode images batch by batch; unreadable inputs come back in `errors`, never as exceptions
    (and are logged as skipped unless not `warn`).

    `encode(pixels, batch_size=...)` turns a pixel batch into rows (default `backend.encode_images`;
    `backend.encode_own_head` gives the model's own logits instead).
    """
    encode = encode or backend.encode_images
    draft_size = backend.decode_size if draft else None
    bar = tqdm(total=len(items), unit="img", disable=None if progress else True, desc="encoding")
    try:
        for batch in iter_batches(items, backend.preprocess, batch_size, num_workers, draft_size, warn=warn):
            if batch.pixels is None:
                feats = torch.empty(0, backend.embed_dim, device=backend.device)
            else:
                feats = encode(batch.pixels, batch_size=batch_size)
            bar.update(len(batch.indices) + len(batch.errors))
            yield EncodedBatch(batch.indices, feats, batch.errors)
    finally:
        bar.close()


def encode_images(
    backend: Backend, items: Sequence[Item], batch_size: int = 32, progress: bool = False, warn: bool = True
) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """All at once: (features of the images that loaded, their positions, failures)."""
    feats, indices, errors = [], [], []
    for b in iter_encoded(backend, items, batch_size=batch_size, progress=progress, warn=warn):
        feats.append(b.features)
        indices.extend(b.indices)
        errors.extend(b.errors)
    out = torch.cat(feats) if feats else torch.empty(0, backend.embed_dim, device=backend.device)
    return out, indices, errors
