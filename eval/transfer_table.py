"""Transfer vs scratch with an image-only backbone: the playbook's claim, measured on the shapes world.

    python -m eval.transfer_table [--shots 1 4 16 100] [--seeds 0 1 2] [--methods ...] [--budget 3m]
    python -m eval.transfer_table --quick                 # 1 seed, 1 and 4 shots, 10 test images per class
    python -m eval.transfer_table --save runs.json        # also keep every run (accuracy, fit time, schedule)
    python -m eval.transfer_table --load a.json b.json    # one table from saved runs

The task of `eval/fewshot_table.py` (name the shape among 6 base and 3 novel shapes, random colours;
9 classes, chance 0.111) with the bundled `shapes-resnet`, a timm ResNet pretrained on a 112-way
shapes-world classification that never drew the novel shapes. Every method runs with its defaults
under the default CPU budget of `fsclip fit` (3 minutes per fit) unless `--budget` says otherwise:
`scratch` (the same architecture, randomly initialised, the same images, augmentation and budget),
the frozen-feature heads `prototype` and `linear-probe`, and `partial-ft`, `full-ft` and `lora` (conv
LoRA here, the backbone being a CNN). Protocol as in CoOp: K training images per class drawn per
seed from a pool of twice the largest K, min(K, 4) validation images per class from a separate pool
of 8, a fixed test set; random resized crops keep >= 80 % of the image (`crop_scale=0.8`) for every
method that augments, as in `eval/fewshot_table.py`.

Prints Markdown: mean test accuracy ± standard deviation over seeds per method and K, the gap of the
best transferred method over scratch, and the mean fit time per method.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from collections import Counter
from pathlib import Path

import torch

from eval._timing import markdown_table
from eval.fewshot_table import cell, sweep, write_task

SHOTS = (1, 4, 16, 100)
MODEL = "shapes-resnet"
ORDER = ("scratch", "prototype", "linear-probe", "partial-ft", "full-ft", "lora", "auto")


def run(methods: list[str], shots: list[int], seeds: list[int], test_per_class: int, budget: str | None,
        model: str = MODEL) -> dict:
    from fsclip.backends import load_model

    backend = load_model(model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        pool, val_pool, test = write_task(Path(tmp), 2 * max(shots), 8, test_per_class)
        runs = sweep(backend, pool, val_pool, test, methods, shots, seeds, budget, logging.getLogger("transfer_table"))
    return {"model": model, "test_per_class": test_per_class, "budget": budget or "default (3m on CPU)",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": runs}


def table(results: dict) -> str:
    runs = results["runs"]
    methods = [m for m in ORDER if any(r["method"] == m for r in runs)]
    methods += sorted({r["method"] for r in runs} - set(methods))
    shots = sorted({r["shots"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    mean = {(m, k): statistics.mean(r["accuracy"] for r in runs if r["method"] == m and r["shots"] == k)
            for m in methods for k in shots if any(r["method"] == m and r["shots"] == k for r in runs)}
    header = ["method", *[f"{k}-shot" for k in shots], "fit time (mean)", f"ran at {shots[-1]} shots"]
    rows = []
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        accs = [cell([r["accuracy"] for r in mine if r["shots"] == k]) if (m, k) in mean else "–" for k in shots]
        last = [r for r in mine if r["shots"] == shots[-1]] or mine
        ran = Counter(r["schedule"] for r in last).most_common(1)[0][0]
        if m == "auto":
            ran = "; ".join(f"{k}: " + "/".join(sorted({r["chose"] for r in mine if r["shots"] == k})) for k in shots)
        rows.append([m, *accs, f"{statistics.mean(r['fit_seconds'] for r in mine):.1f} s", ran])
    transfer = [m for m in methods if m not in ("scratch", "auto")]
    if "scratch" in methods and transfer:
        gaps = []
        for k in shots:
            best = max((mean[m, k], m) for m in transfer if (m, k) in mean)
            gaps.append(f"{best[0] - mean['scratch', k]:+.3f} ({best[1]})" if ("scratch", k) in mean else "–")
        rows.append(["best transfer − scratch", *gaps, "", ""])
    note = (f"\n\n{results['model']}, shapes world, 9 classes (6 base + 3 novel shapes), test "
            f"{results['test_per_class']} images per class, seeds {', '.join(map(str, seeds))}; validation min(K, 4) "
            f"per class; budget {results['budget']} per fit; crop_scale 0.8 for every method that augments; CPU, "
            f"torch {results['torch']}, {results['threads']} thread(s). 'ran': steps planned / the method's default "
            "(cut where the budget did not fit it).")
    return markdown_table(header, rows) + note


def main(argv=None) -> int:
    from fsclip.adapters import AUTO, list_adapters

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(ORDER), choices=[AUTO, *list_adapters()])
    p.add_argument("--model", default=MODEL, help=f"an image model spec (default: {MODEL})")
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--budget", default=None, help="budget per fit (default: fsclip fit's, 3m on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 1 and 4 shots, 10 test images per class, budget 20s: checks that it runs")
    p.add_argument("--save", type=Path, default=None, help="also write every run to this JSON file")
    p.add_argument("--load", type=Path, nargs="+", default=None, help="build the table from saved runs instead")
    p.add_argument("-v", "--verbose", action="store_true", help="log each fit")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.load:
        parts = [json.loads(path.read_text()) for path in args.load]
        results = {**parts[0], "runs": [r for part in parts for r in part["runs"]]}
    else:
        if args.quick:
            args.seeds, args.shots, args.test_per_class = args.seeds[:1], [1, 4], 10
            args.budget = args.budget or "20s"
        results = run(args.methods, args.shots, args.seeds, args.test_per_class, args.budget, args.model)
        if args.save:
            args.save.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
