"""Search quality of a shapes-world model: what the top 10 of image and text queries agree on.

    python -m eval.shapes_search_quality [--model shapes] [--seeds 0 1 2]

For each seed, 480 images (8 colours x 6 base shapes x 10) are drawn; every 10th image of a pair seen
in pretraining queries the others (exact cosine search, as the flat index does), and each colour +
shape caption queries the images. Prints precision@10 per seed: image -> image on colour and shape
together and on each alone, and text -> image on colour and shape.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def measure(backend, seed: int) -> dict[str, float]:
    from fsclip.shapes.world import BASE_SHAPES, COLOURS, heldout_combos, render

    rng = np.random.default_rng(seed)
    labels = [(c, s) for c in COLOURS for s in BASE_SHAPES for _ in range(10)]
    images = backend.encode_images(torch.stack([backend.preprocess(render(c, s, rng, 96)) for c, s in labels]))
    sim = images @ images.T  # (N, D) @ (D, N) -> (N, N)
    sim.fill_diagonal_(-2.0)
    top = sim.topk(10, dim=1).indices.tolist()
    held = set(heldout_combos())
    queries = [i for i, cs in enumerate(labels) if i % 10 == 0 and cs not in held]

    def agree(same) -> float:
        return float(np.mean([[same(labels[j], labels[i]) for j in top[i]] for i in queries]))

    pairs = sorted(set(labels))
    text = backend.encode_texts([f"a photo of a {c} {s}." for c, s in pairs])
    text_top = (text @ images.T).topk(10, dim=1).indices.tolist()
    return {
        "image->image colour+shape": agree(lambda a, b: a == b),
        "image->image shape": agree(lambda a, b: a[1] == b[1]),
        "image->image colour": agree(lambda a, b: a[0] == b[0]),
        "text->image colour+shape": float(np.mean([[labels[j] == cs for j in text_top[k]] for k, cs in enumerate(pairs)])),
    }


def main(argv=None) -> int:
    from fsclip.backends import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    backend = load_model(args.model, device="cpu")
    for seed in args.seeds:
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in measure(backend, seed).items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
