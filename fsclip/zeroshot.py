"""Zero-shot classification: class names -> prompt-ensemble text classifier -> probabilities."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from fsclip._cache import cache_dir
from fsclip._io import atomic_write
from fsclip.backends import Backend
from fsclip.errors import UsageError
from fsclip.prompts_io import fill, load_templates, read_text_file

__all__ = ["ZeroShotClassifier", "build_text_classifier", "parse_labels", "scores_from_logits"]

logger = logging.getLogger(__name__)


def parse_labels(labels: str | Sequence[str] | None = None, labels_file: str | None = None) -> list[str]:
    """`"cat, dog"` or a list, or a file with one label per line (blank lines and `#` comments skipped).

    Labels that differ only in case or spacing are duplicates: the tokenizers lowercase and split on
    whitespace, so both would get the same embedding and tie at every image.
    """
    if (labels is None) == (labels_file is None):
        raise UsageError("give exactly one of --labels or --labels-file")
    if labels_file is not None:
        lines = read_text_file(labels_file, "labels file").splitlines()
        out = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    elif isinstance(labels, str):
        out = [s.strip() for s in labels.split(",") if s.strip()]
    else:
        out = [str(s).strip() for s in labels]
    if len(out) < 2:
        raise UsageError(f"need at least 2 labels, got {len(out)}: {out}")
    seen: dict[str, str] = {}
    dupes = []
    for label in out:
        key = " ".join(label.casefold().split())
        if key in seen:
            dupes.append(f"{seen[key]!r} and {label!r}" if seen[key] != label else repr(label))
        seen.setdefault(key, label)
    if dupes:
        raise UsageError(f"duplicate labels (compared ignoring case and spacing): {', '.join(dupes)}")
    return out


def _cache_key(backend: Backend, templates: list[str], labels: list[str]) -> str:
    blob = json.dumps([backend.features_id, templates, labels], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _from_cache(path: Path, shape: tuple[int, int]) -> torch.Tensor | None:
    """The cached (C, D) class embeddings, or None when absent or damaged (then they are encoded again)."""
    try:
        weights = load_file(path)["weights"]
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - a torn or foreign file (SafetensorError, KeyError, ...) is a miss
        logger.warning("label-embedding cache %s is damaged (%s); encoding the labels again", path, e)
        return None
    # rows are unit vectors: a zeroed, scaled or non-finite row is damage, not a valid classifier
    if (weights.shape != shape or weights.dtype != torch.float32
            or not bool(((weights.norm(dim=-1) - 1).abs() < 1e-3).all())):
        logger.warning("label-embedding cache %s is damaged (shape %s, not unit rows); encoding the labels again",
                       path, tuple(weights.shape))
        return None
    return weights


def _encode_prompts(backend: Backend, texts: list[str], batch_size: int, progress: bool) -> torch.Tensor:
    """(N, D) text features in chunks, with a progress bar (or, when stderr is not a terminal, a log line
    every 30 s): thousands of labels x 80 templates take minutes on a CPU."""
    chunk = 16 * batch_size  # large enough that length-sorted batching inside encode_texts still pays
    out = torch.empty(len(texts), backend.embed_dim, device=backend.device)
    bar = tqdm(total=len(texts), unit="prompt", desc="encoding labels", disable=None if progress else True,
               leave=False)
    last = time.monotonic()
    try:
        for start in range(0, len(texts), chunk):
            out[start:start + chunk] = backend.encode_texts(texts[start:start + chunk], batch_size=batch_size)
            bar.update(min(chunk, len(texts) - start))
            if bar.disable and time.monotonic() - last > 30:
                last = time.monotonic()
                logger.info("encoded %d of %d label prompts", start + chunk, len(texts))
    finally:
        bar.close()
    return out


def build_text_classifier(
    backend: Backend, labels: Sequence[str], templates: Sequence[str], batch_size: int = 256, use_cache: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """(C, D) class embeddings: per-template embeddings normalised, averaged, renormalised (open_clip recipe).

    Cached on disk keyed by (model weights and dtype, templates, labels): a second call encodes no text.
    A damaged cache file is a miss.
    """
    labels, templates = list(labels), list(templates)
    path = cache_dir("text") / f"{_cache_key(backend, templates, labels)}.safetensors"
    if use_cache:
        cached = _from_cache(path, (len(labels), backend.embed_dim))
        if cached is not None:
            logger.info("label embeddings from cache %s", path)
            return cached.to(backend.device)
    texts = [fill(t, label) for label in labels for t in templates]
    emb = _encode_prompts(backend, texts, batch_size, progress)  # (C*T, D)
    emb = emb.view(len(labels), len(templates), -1).mean(dim=1)  # (C, D)
    weights = emb / emb.norm(dim=-1, keepdim=True)
    if use_cache and bool(torch.isfinite(weights).all()):
        with atomic_write(path) as f:
            f.write(save({"weights": weights.float().cpu().contiguous()}))
    return weights


def scores_from_logits(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Softmax over classes for CLIP; independent sigmoids for SigLIP (scores need not sum to 1)."""
    return torch.sigmoid(logits) if kind == "sigmoid" else logits.softmax(dim=-1)


class ZeroShotClassifier:
    """Text-only classifier over `labels` for one model.

    Example:
        >>> clf = ZeroShotClassifier(load_model("shapes"), ["circle", "square"], "generic")
        >>> probs = clf.predict_proba(features)  # (N, 2)
    """

    def __init__(
        self,
        backend: Backend,
        labels: Sequence[str],
        templates: str | Sequence[str] = "imagenet80",
        use_cache: bool = True,
        progress: bool = False,
    ):
        self.backend = backend
        self.labels = list(labels)
        self.templates = load_templates(templates)
        self.weights = build_text_classifier(backend, self.labels, self.templates, use_cache=use_cache,
                                             progress=progress)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) normalised image features -> (N, C) logits, with the model's scale (and bias)."""
        logits = self.backend.logit_scale * features @ self.weights.T  # (N, D) @ (D, C) -> (N, C)
        bias = self.backend.logit_bias
        return logits + bias if bias is not None and self.backend.loss_kind == "sigmoid" else logits

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        return scores_from_logits(self.logits(features), self.backend.loss_kind)
