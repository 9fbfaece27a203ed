"""Zero-shot classification: class names -> prompt-ensemble text classifier -> probabilities."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from fsclip._cache import cache_dir
from fsclip._io import atomic_write
from fsclip.backends import Backend
from fsclip.errors import UsageError
from fsclip.prompts_io import fill, load_templates

__all__ = ["ZeroShotClassifier", "build_text_classifier", "parse_labels", "scores_from_logits"]

logger = logging.getLogger(__name__)


def parse_labels(labels: str | Sequence[str] | None = None, labels_file: str | None = None) -> list[str]:
    """`"cat, dog"` or a list, or a file with one label per line (blank lines and `#` comments skipped)."""
    if (labels is None) == (labels_file is None):
        raise UsageError("give exactly one of --labels or --labels-file")
    if labels_file is not None:
        try:
            lines = Path(labels_file).read_text().splitlines()
        except FileNotFoundError:
            raise UsageError(f"labels file {labels_file!r} not found") from None
        out = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    elif isinstance(labels, str):
        out = [s.strip() for s in labels.split(",") if s.strip()]
    else:
        out = [str(s).strip() for s in labels]
    if len(out) < 2:
        raise UsageError(f"need at least 2 labels, got {len(out)}: {out}")
    dupes = sorted({s for s in out if out.count(s) > 1})
    if dupes:
        raise UsageError(f"duplicate labels: {', '.join(dupes)}")
    return out


def _cache_key(backend: Backend, templates: list[str], labels: list[str]) -> str:
    blob = json.dumps([backend.features_id, templates, labels], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def build_text_classifier(
    backend: Backend, labels: Sequence[str], templates: Sequence[str], batch_size: int = 256, use_cache: bool = True
) -> torch.Tensor:
    """(C, D) class embeddings: per-template embeddings normalised, averaged, renormalised (open_clip recipe).

    Cached on disk keyed by (model weights, templates, labels): a second call encodes no text.
    """
    labels, templates = list(labels), list(templates)
    path = cache_dir("text") / f"{_cache_key(backend, templates, labels)}.safetensors"
    if use_cache and path.exists():
        logger.info("label embeddings from cache %s", path)
        return load_file(path)["weights"].to(backend.device)
    texts = [fill(t, label) for label in labels for t in templates]
    emb = backend.encode_texts(texts, batch_size=batch_size)  # (C*T, D)
    emb = emb.view(len(labels), len(templates), -1).mean(dim=1)  # (C, D)
    weights = emb / emb.norm(dim=-1, keepdim=True)
    if use_cache:
        with atomic_write(path) as f:
            f.write(save({"weights": weights.cpu().contiguous()}))
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
    ):
        self.backend = backend
        self.labels = list(labels)
        self.templates = load_templates(templates)
        self.weights = build_text_classifier(backend, self.labels, self.templates, use_cache=use_cache)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) normalised image features -> (N, C) logits, with the model's scale (and bias)."""
        logits = self.backend.logit_scale * features @ self.weights.T  # (N, D) @ (D, C) -> (N, C)
        bias = self.backend.logit_bias
        return logits + bias if bias is not None and self.backend.loss_kind == "sigmoid" else logits

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        return scores_from_logits(self.logits(features), self.backend.loss_kind)
