"""Few-shot accuracy table on the shapes world: every method at 1/2/4/8/16 shots vs zero-shot.

    python -m eval.fewshot_table [--shots 1 2 4 8 16] [--seeds 0] [--methods ...] [--test-per-class 50]

The task the tests use: name the shape among the 6 base shapes and the 3 novel ones the bundled
shapes-world CLIP never saw in pretraining (9 classes, random colours). Protocol as in CoOp: K training
images per class (drawn per seed from a pool of twice the largest K), min(K, 4) validation images per
class (from a separate pool of 8), and a fixed test set; every method uses the "shapes" prompt
templates. Methods that train the towers run with the CPU budget in `BUDGET` (the papers' schedules are
GPU-sized: CLIP-LoRA's 500 steps per shot); the table says which. Prints Markdown, one row per method,
mean test accuracy (± standard deviation) over seeds.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from eval._timing import markdown_table

SHOTS = (1, 2, 4, 8, 16)
ORDER = ("linear-probe", "tip-adapter", "tip-adapter-f", "lora", "partial-ft", "full-ft")  # light to heavy
# CPU budgets for the methods that train the towers (steps and learning rates), chosen on validation.
# Random resized crops keep >= 80% of the area: the shapes are small and anywhere in the image, and
# smaller crops cut them off (the playbook's "augment only where realistic").
BUDGET: dict[str, dict] = {
    "tip-adapter-f": {"crop_scale": 0.8},
    "lora": {"iters_per_shot": 25, "lr": 1e-3, "rank": 8, "alpha": 16, "crop_scale": 0.8},
    "partial-ft": {"epochs": 30, "lr": 5e-4, "head_lr": 5e-3, "crop_scale": 0.8},
    "full-ft": {"epochs": 30, "lr": 5e-4, "head_lr": 5e-3, "crop_scale": 0.8},
}


def write_task(root: Path, train_per_class: int = 16, val_per_class: int = 4, test_per_class: int = 50):
    """ImageFolders train/ val/ test/ of the 9 shapes in random colours; returns their `LabeledImages`."""
    from fsclip.data import load_image_folder
    from fsclip.shapes import BASE_SHAPES, COLOURS, NOVEL_SHAPES, write_folder

    classes = {s: [(c, s) for c in COLOURS] for s in BASE_SHAPES + NOVEL_SHAPES}
    for name, n, seed in (("train", train_per_class, 0), ("val", val_per_class, 1), ("test", test_per_class, 2)):
        write_folder(root / name, classes, n, seed=seed)
    pool = load_image_folder(root / "train")
    names = list(pool.classes)
    return pool, load_image_folder(root / "val", names), load_image_folder(root / "test", names)


def accuracy(adapter, test) -> float:
    probs = adapter.predict_proba(test.paths)
    return float((probs.argmax(1) == torch.tensor(test.targets)).float().mean())


def zero_shot_accuracy(backend, test, templates: str = "shapes") -> float:
    from fsclip.adapters._features import encode_items
    from fsclip.prompts_io import load_templates
    from fsclip.zeroshot import build_text_classifier

    text = build_text_classifier(backend, test.classes, load_templates(templates)).float().cpu()
    pred = (encode_items(backend, test.paths) @ text.T).argmax(1)
    return float((pred == torch.tensor(test.targets)).float().mean())


def run(methods: list[str], shots: list[int], seeds: list[int], test_per_class: int) -> str:
    from fsclip.adapters import fit
    from fsclip.backends import load_model
    from fsclip.data import sample_shots

    backend = load_model("shapes", device="cpu")
    results: dict[str, dict[int, list[float]]] = {m: {k: [] for k in shots} for m in methods}
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        # pools twice the largest draw, so that every seed samples other training and validation images
        pool, val_pool, test = write_task(Path(tmp), 2 * max(shots), 8, test_per_class)
        zs = zero_shot_accuracy(backend, test)
        for k in shots:
            for seed in seeds:
                train = sample_shots(pool, k, seed)
                val = sample_shots(val_pool, min(k, 4), seed)
                for m in methods:
                    t0 = time.perf_counter()
                    adapter = fit(backend, train, m, val=val, templates="shapes", seed=seed, **BUDGET.get(m, {}))
                    seconds[m].append(time.perf_counter() - t0)
                    results[m][k].append(accuracy(adapter, test))
                    logging.getLogger("fewshot_table").info("%s %d-shot seed %d: %.3f", m, k, seed, results[m][k][-1])

    def cell(values: list[float]) -> str:
        mean = statistics.mean(values)
        return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {statistics.stdev(values):.3f}"

    header = ["method", *[f"{k}-shot" for k in shots], "fit time (mean)", "budget"]
    rows = [["zero-shot", *[f"{zs:.3f}"] * len(shots), "-", "-"]]
    for m in methods:
        budget = ", ".join(f"{k}={v:g}" for k, v in BUDGET.get(m, {}).items()) or "defaults"
        rows.append([m, *[cell(results[m][k]) for k in shots], f"{statistics.mean(seconds[m]):.1f} s", budget])
    note = (f"\n\nShapes world, 9 classes (6 base + 3 novel shapes), test {test_per_class} images per class, "
            f"seeds {', '.join(map(str, seeds))}; validation min(K, 4) per class; CPU, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads.")
    return markdown_table(header, rows) + note


def main(argv=None) -> int:
    from fsclip.adapters import list_adapters

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    default = [m for m in ORDER if m in list_adapters()] + [m for m in list_adapters() if m not in ORDER]
    p.add_argument("--methods", nargs="+", default=default, choices=list_adapters())
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("-v", "--verbose", action="store_true", help="log each fit")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    print(run(args.methods, args.shots, args.seeds, args.test_per_class))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
