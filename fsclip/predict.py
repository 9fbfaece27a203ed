"""Turn class probabilities into the JSON-Lines records shared by `classify` and `predict`.

Record contract (one per input, in input order):
    {"path": ..., "label": top label or "unknown", "predictions": [{"label": ..., "score": ...}, ...]}
    {"path": ..., "error": "reason"}
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import Image

from fsclip._paths import display_path
from fsclip.backends import Backend
from fsclip.encode import iter_encoded
from fsclip.errors import FsclipError, UsageError

__all__ = ["UNKNOWN", "predict_records", "top_predictions"]

UNKNOWN = "unknown"


def _name(item) -> str:
    return f"<image {id(item):x}>" if isinstance(item, Image.Image) else display_path(item)


def top_predictions(
    probs: torch.Tensor, labels: Sequence[str], top_k: int = 5, threshold: float | None = None
) -> list[dict]:
    """(N, C) scores -> per row `{"label", "predictions"}`, abstaining below `threshold`."""
    if top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {top_k}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {threshold}")
    k = min(top_k, probs.shape[1])
    scores, idx = probs.topk(k, dim=-1)
    out = []
    for s_row, i_row in zip(scores.tolist(), idx.tolist()):
        preds = [{"label": labels[i], "score": round(s, 6)} for s, i in zip(s_row, i_row)]
        best = preds[0]
        label = UNKNOWN if threshold is not None and best["score"] < threshold else best["label"]
        out.append({"label": label, "predictions": preds})
    return out


def predict_records(
    backend: Backend,
    items: Sequence[str | os.PathLike | Image.Image],
    proba: Callable[[torch.Tensor], torch.Tensor],
    labels: Sequence[str],
    top_k: int = 5,
    threshold: float | None = None,
    batch_size: int = 32,
    progress: bool = False,
    encode: Callable[..., torch.Tensor] | None = None,
) -> Iterator[dict]:
    """Encode `items`, score them with `proba` ((N, D) features -> (N, C)), yield records in order.

    `encode` replaces `backend.encode_images` (see `fsclip.encode.iter_encoded`), e.g. with
    `backend.encode_own_head` and a softmax as `proba` for the model's own classes.
    """
    top_predictions(torch.zeros(1, len(labels)), labels, top_k, threshold)  # validate before any work
    for batch in iter_encoded(backend, items, batch_size=batch_size, progress=progress, encode=encode):
        records: dict[int, dict] = {i: {"path": _name(items[i]), "error": err} for i, err in batch.errors}
        if batch.indices:
            with torch.inference_mode():
                probs = proba(batch.features).float().cpu()
            finite = torch.isfinite(probs).all(dim=-1)
            if not bool(finite.all()):  # never a NaN score in the output: JSON has no NaN, and it ranks nothing
                first = batch.indices[int((~finite).nonzero()[0])]
                raise FsclipError(f"the model or adapter gave NaN or infinite scores for {_name(items[first])}; "
                                  "its weights are damaged")
            for i, rec in zip(batch.indices, top_predictions(probs, labels, top_k, threshold)):
                records[i] = {"path": _name(items[i]), **rec}
        for i in sorted(records):
            yield records[i]
