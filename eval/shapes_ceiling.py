"""How far frozen features of a shapes CLIP go on the few-shot task: the ceiling every frozen method sits under.

    python -m eval.shapes_ceiling                         # the bundled shapes CLIP
    python -m eval.shapes_ceiling --model /tmp/run6       # a checkpoint from `python -m fsclip.shapes.train`

The task and draws of `eval/fewshot_table.py` (9 shapes, 3 of them never drawn in pretraining; K
training images per class from a pool of 2 x 16, validation min(K, 4) from a pool of 8, 50 test
images per class, seeds 0, 1, 2). A logistic-regression probe (scikit-learn, the `eval` extra) on
the frozen image embeddings, and on the features before the image tower's final projection; C is
chosen on the validation images from a grid, so the figures are an upper bound for a frozen probe.
Prints mean ± std test accuracy per K and the most frequent confusions at the largest K.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

C_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)


def pooled_features(backend, paths) -> torch.Tensor:
    """(N, W) normalised image features before the final projection."""
    from fsclip.adapters._features import _forward_crops, load_images_or_fail

    return F.normalize(_forward_crops(backend, load_images_or_fail(paths, "image"), 64, pooled=True), dim=-1)


def probe(feats: dict[str, torch.Tensor], targets: dict[str, np.ndarray], draws) -> tuple[list[float], Counter]:
    """Test accuracies over `draws` (train, val) index pairs, and (true, predicted) confusion counts."""
    from sklearn.linear_model import LogisticRegression

    accs, confusions = [], Counter()
    for tr, va in draws:
        fits = [LogisticRegression(C=c, max_iter=5000).fit(feats["pool"][tr], targets["pool"][tr]) for c in C_GRID]
        best = max(fits, key=lambda m: m.score(feats["val"][va], targets["val"][va]))  # first best: strongest L2
        pred = best.predict(feats["test"])
        accs.append(float((pred == targets["test"]).mean()))
        confusions.update((int(t), int(p)) for t, p in zip(targets["test"], pred) if t != p)
    return accs, confusions


def main(argv=None) -> int:
    from eval.fewshot_table import write_task
    from fsclip.adapters._features import encode_items
    from fsclip.backends import load_model
    from fsclip.data import sample_shots

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes", help="model spec or checkpoint folder (default: the bundled one)")
    p.add_argument("--shots", type=int, nargs="+", default=[4, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)

    backend = load_model(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        pool, val_pool, test = write_task(Path(tmp), 2 * 16, 8, 50)
        sets = {"pool": pool, "val": val_pool, "test": test}
        targets = {k: np.asarray(v.targets) for k, v in sets.items()}
        kinds = {
            "embedding": {k: encode_items(backend, v.paths, cache=False).numpy() for k, v in sets.items()},
            "before projection": {k: pooled_features(backend, v.paths).numpy() for k, v in sets.items()},
        }
        index = {k: {p: i for i, p in enumerate(v.paths)} for k, v in sets.items()}
        print(f"model {args.model}; frozen-feature probe, C from {C_GRID} on validation; seeds {args.seeds}\n")
        print("| features | " + " | ".join(f"{k}-shot" for k in args.shots) + " |")
        print("|---" * (len(args.shots) + 1) + "|")
        worst = {}
        for name, feats in kinds.items():
            cells = []
            for k in args.shots:
                draws = [([index["pool"][p] for p in sample_shots(pool, k, s).paths],
                          [index["val"][p] for p in sample_shots(val_pool, min(k, 4), s).paths]) for s in args.seeds]
                accs, confusions = probe(feats, targets, draws)
                cells.append(f"{np.mean(accs):.3f} ± {np.std(accs):.3f}")
                worst[name] = confusions
            print(f"| {name} | " + " | ".join(cells) + " |")
        for name, confusions in worst.items():
            top = ", ".join(f"{pool.classes[t]} -> {pool.classes[p]} {n}" for (t, p), n in confusions.most_common(4))
            print(f"\nmost frequent errors at {args.shots[-1]} shots ({name}, all seeds): {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
