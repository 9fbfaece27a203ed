"""Metrics: top-1, mean per-class recall, calibration (ECE, reliability bins), confusion, retrieval R@K."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fsclip.calibration import calibration_bins, ece_from_bins

__all__ = ["calibration_bins", "classification_metrics", "ece_from_bins", "retrieval_metrics"]


def classification_metrics(
    probs: torch.Tensor, targets: torch.Tensor, classes: Sequence[str],
    groups: Mapping[str, Sequence[str]] | None = None, bins: int = 15, confusion_max_classes: int = 200,
) -> dict[str, Any]:
    """Metrics of (N, C) class probabilities against (N,) targets.

    Returns:
        top1; mean_per_class_recall (over the classes that have test images; balanced accuracy);
        per_class_recall; group_recall (mean recall over each named group of classes); nll; ece;
        calibration bins; confusion (rows: true class, columns: predicted), or None above
        `confusion_max_classes` classes, where it would dwarf the rest of the result.
    """
    probs, targets = probs.float().cpu(), targets.long().cpu()
    num = len(classes)
    pred = probs.argmax(dim=-1)
    confusion = torch.bincount(targets * num + pred, minlength=num * num).view(num, num)  # (C, C)
    support = confusion.sum(dim=1)
    recall = {classes[c]: (float(confusion[c, c] / support[c]) if support[c] else None) for c in range(num)}
    present = [r for r in recall.values() if r is not None]
    cal = calibration_bins(probs, targets, bins)
    group_recall = {}
    for name, members in (groups or {}).items():
        vals = [recall[m] for m in members if recall.get(m) is not None]
        group_recall[name] = sum(vals) / len(vals) if vals else None
    return {
        "n": len(targets),
        "top1": float((pred == targets).float().mean()) if len(targets) else 0.0,
        "mean_per_class_recall": sum(present) / len(present) if present else 0.0,
        "per_class_recall": recall,
        "group_recall": group_recall,
        "nll": float(F.nll_loss(probs.clamp_min(1e-12).log(), targets)) if len(targets) else 0.0,
        "ece": ece_from_bins(cal),
        "calibration": cal,
        "confusion": confusion.tolist() if num <= confusion_max_classes else None,
    }


def retrieval_metrics(
    image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10), chunk: int = 1024,
) -> dict[str, float]:
    """Recall@K both ways with normalised (N, D) image and (M, D) text features.

    `text_image[j]` is the image that caption j describes. Text-to-image: the share of captions whose
    image is among the top K images. Image-to-text: the share of images with at least one of their
    captions among the top K captions (the CLIP paper's protocol).
    """
    image_features, text_features = image_features.float().cpu(), text_features.float().cpu()
    text_image = text_image.long().cpu()
    kmax = min(max(ks), len(image_features))
    t2i_hits = {k: 0 for k in ks}
    for start in range(0, len(text_features), chunk):
        sims = text_features[start:start + chunk] @ image_features.T  # (b, D) @ (D, N) -> (b, N)
        top = sims.topk(kmax, dim=-1).indices  # (b, kmax)
        hit = top == text_image[start:start + chunk, None]
        for k in ks:
            t2i_hits[k] += int(hit[:, :k].any(dim=-1).sum())
    kmax_t = min(max(ks), len(text_features))
    i2t_hits = {k: 0 for k in ks}
    for start in range(0, len(image_features), chunk):
        sims = image_features[start:start + chunk] @ text_features.T  # (b, D) @ (D, M) -> (b, M)
        top = sims.topk(kmax_t, dim=-1).indices  # (b, kmax)
        owner = text_image[top]  # (b, kmax) image of each retrieved caption
        hit = owner == torch.arange(start, start + len(sims))[:, None]
        for k in ks:
            i2t_hits[k] += int(hit[:, :k].any(dim=-1).sum())
    out = {f"image_to_text_R@{k}": i2t_hits[k] / len(image_features) for k in ks}
    out.update({f"text_to_image_R@{k}": t2i_hits[k] / len(text_features) for k in ks})
    return out
