"""Metrics against independent references: scikit-learn, and brute-force loops."""

from __future__ import annotations

import pytest
import torch

from fsclip.evaluation.metrics import (
    calibration_bins,
    classification_metrics,
    ece_from_bins,
    retrieval_metrics,
)


@pytest.fixture
def predictions():
    g = torch.Generator().manual_seed(0)
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate([30, 10, 5, 15])])  # imbalanced
    logits = torch.randn(len(targets), 4, generator=g) * 2
    logits[torch.arange(len(targets)), targets] += 1.5  # better than chance, not perfect
    return logits.softmax(-1), targets


def test_classification_metrics_match_sklearn(predictions):
    sk = pytest.importorskip("sklearn.metrics")
    probs, targets = predictions
    classes = ["a", "b", "c", "d"]
    m = classification_metrics(probs, targets, classes, groups={"rare": ["b", "c"]})
    pred = probs.argmax(-1).numpy()
    assert m["top1"] == pytest.approx(sk.accuracy_score(targets.numpy(), pred))
    assert m["mean_per_class_recall"] == pytest.approx(sk.balanced_accuracy_score(targets.numpy(), pred))
    assert m["confusion"] == sk.confusion_matrix(targets.numpy(), pred, labels=range(4)).tolist()
    assert m["nll"] == pytest.approx(sk.log_loss(targets.numpy(), probs.numpy(), labels=range(4)), rel=1e-5)
    recall = sk.recall_score(targets.numpy(), pred, average=None, labels=range(4))
    assert m["group_recall"]["rare"] == pytest.approx((recall[1] + recall[2]) / 2)
    assert 0.3 < m["top1"] < 0.95  # the fixture is neither trivial nor hopeless


def test_ece_matches_brute_force(predictions):
    probs, targets = predictions
    conf, pred = probs.max(-1)
    total = 0.0
    for b in range(15):  # equal-width bins [lo, hi), the last one closed
        lo, hi = b / 15, (b + 1) / 15
        inside = (conf >= lo) & ((conf < hi) if b < 14 else (conf <= hi))
        if inside.any():
            total += inside.sum() * abs((pred[inside] == targets[inside]).float().mean() - conf[inside].mean())
    ece = classification_metrics(probs, targets, list("abcd"))["ece"]
    assert ece == pytest.approx(float(total) / len(targets), abs=1e-6)


def test_calibration_bins_pool_exactly_over_runs(predictions):
    probs, targets = predictions
    whole = calibration_bins(probs, targets)
    a, b = calibration_bins(probs[:20], targets[:20]), calibration_bins(probs[20:], targets[20:])
    pooled = {k: [x + y for x, y in zip(a[k], b[k])] for k in a}
    for k in whole:
        assert pooled[k] == pytest.approx(whole[k])
    assert ece_from_bins(pooled) == pytest.approx(ece_from_bins(whole))


def test_class_without_test_images_is_left_out_of_the_mean():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]])
    m = classification_metrics(probs, torch.tensor([0, 0]), ["x", "y", "z"])
    assert m["per_class_recall"] == {"x": 0.5, "y": None, "z": None}
    assert m["mean_per_class_recall"] == 0.5


def test_retrieval_recall_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    images = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1)
    owners = torch.arange(30).repeat_interleave(3)[:80]  # 3 captions per image, the last images fewer
    texts = torch.nn.functional.normalize(images[owners] + 0.9 * torch.randn(80, 8, generator=g), dim=-1)
    got = retrieval_metrics(images, texts, owners, ks=(1, 5, 10), chunk=7)  # chunking must not matter
    sims = texts @ images.T
    for k in (1, 5, 10):
        t2i = sum(int(owners[j]) in sims[j].argsort(descending=True)[:k].tolist() for j in range(len(texts)))
        i2t = sum(any(int(owners[t]) == i for t in sims[:, i].argsort(descending=True)[:k].tolist())
                  for i in range(len(images)))
        assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i / len(texts))
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t / len(images))
    assert 0.1 < got["text_to_image_R@1"] < got["text_to_image_R@10"] < 1.0
