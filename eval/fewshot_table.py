"""Few-shot accuracy table on the shapes world: every method at 1/2/4/8/16 shots vs zero-shot, under a budget.

    python -m eval.fewshot_table [--shots 1 2 4 8 16] [--seeds 0 1 2] [--methods ...] [--budget 3m]
    python -m eval.fewshot_table --quick            # 1 seed, 2 shot counts, small test set: checks it runs
    python -m eval.fewshot_table --save runs.json   # also keep every run (accuracy, fit time, schedule)
    python -m eval.fewshot_table --load a.json b.json   # one table from saved runs
    python -m eval.fewshot_table --methods clap --option lagrangian_updates=true   # a method's option

The task the tests use: name the shape among the 6 base shapes and the 3 novel ones the bundled
shapes-world CLIP never saw in pretraining (9 classes, random colours). Protocol as in CoOp: K training
images per class (drawn per seed from a pool of twice the largest K), min(K, 4) validation images per
class (from a separate pool of 8), and a fixed test set; every method uses the "shapes" prompt
templates and its own defaults, under the default CPU budget of `fsclip fit` (3 minutes per fit) unless
`--budget` says otherwise, so schedules the budget cuts are cut here too; the last column shows what
ran at the largest K. One data-level choice applies to every method that augments: random resized
crops keep >= 80 % of the image (`crop_scale=0.8`), since the shapes are small and anywhere in the
image and smaller crops cut them off (the playbook's "augment only where realistic").

Prints Markdown, one row per method: mean test accuracy (± standard deviation over seeds), mean fit
time, and for `auto` the methods it chose.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from eval._timing import markdown_table

SHOTS = (1, 2, 4, 8, 16)
# light to heavy; `auto` last
ORDER = ("linear-probe", "tip-adapter", "tip-adapter-f", "clap", "coop", "prolip", "lora", "partial-ft", "full-ft",
         "auto")
DATA_OPTIONS = {"crop_scale": 0.8}  # the shapes world's realistic augmentation, for every method that has it


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


def options_for(method: str) -> dict:
    """`DATA_OPTIONS` the method has (auto: all, the advisor drops what its choice lacks)."""
    from fsclip.adapters import get_adapter

    if method == "auto":
        return dict(DATA_OPTIONS)
    fields = get_adapter(method).config_class.fields()
    return {k: v for k, v in DATA_OPTIONS.items() if k in fields}


def _schedule(adapter) -> str:
    """What ran, e.g. 'views 20/20, steps 3600/3600' (planned / the method's default)."""
    parts = []
    sel = adapter.selection
    train = getattr(adapter, "train_result", {}).get("schedule") or sel.get("training")
    for label, plan in (("views", sel.get("views")), ("steps", train)):
        if isinstance(plan, dict) and plan.get("planned") is not None:
            parts.append(f"{label} {plan['planned']}/{plan['default']}")
    return ", ".join(parts) or "-"


def sweep(backend, pool, val_pool, test, methods: list[str], shots: list[int], seeds: list[int],
          budget: str | None, log: logging.Logger, **fit_options) -> list[dict]:
    """Every method at every K and seed: K training and min(K, 4) validation images per class drawn per
    seed, fitted under `budget`, scored on `test`; one record per fit."""
    from fsclip.adapters import fit
    from fsclip.data import sample_shots

    runs = []
    for k in shots:
        for seed in seeds:
            train = sample_shots(pool, k, seed)
            val = sample_shots(val_pool, min(k, 4), seed)
            for m in methods:
                t0 = time.perf_counter()
                adapter = fit(backend, train, m, val=val, seed=seed, budget=budget, **options_for(m), **fit_options)
                seconds = time.perf_counter() - t0
                acc = accuracy(adapter, test)
                runs.append({"method": m, "shots": k, "seed": seed, "accuracy": acc, "fit_seconds": seconds,
                             "chose": adapter.name, "schedule": _schedule(adapter)})
                log.info("%s %d-shot seed %d: %.3f (%s, %.0f s, %s)", m, k, seed, acc, adapter.name, seconds,
                         runs[-1]["schedule"])
    return runs


def cell(values: list[float]) -> str:
    """Mean ± standard deviation over seeds (the mean alone for one seed)."""
    mean = statistics.mean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def run(methods: list[str], shots: list[int], seeds: list[int], test_per_class: int, budget: str | None,
        options: dict | None = None) -> dict:
    from fsclip.backends import load_model

    backend = load_model("shapes", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        # pools twice the largest draw, so that every seed samples other training and validation images
        pool, val_pool, test = write_task(Path(tmp), 2 * max(shots), 8, test_per_class)
        zs = zero_shot_accuracy(backend, test)
        runs = sweep(backend, pool, val_pool, test, methods, shots, seeds, budget, logging.getLogger("fewshot_table"),
                     templates="shapes", **(options or {}))
    return {"zero_shot": zs, "test_per_class": test_per_class, "budget": budget or "default (3m on CPU)",
            "options": options or {}, "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": runs}


def table(results: dict) -> str:
    runs = results["runs"]
    methods = [m for m in ORDER if any(r["method"] == m for r in runs)]
    methods += sorted({r["method"] for r in runs} - set(methods))
    shots = sorted({r["shots"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})

    zs = results["zero_shot"]
    header = ["method", *[f"{k}-shot" for k in shots], "fit time (mean)", f"ran at {shots[-1]} shots"]
    rows = [["zero-shot", *[f"{zs:.3f}"] * len(shots), "-", "-"]]
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        accs = [cell([r["accuracy"] for r in mine if r["shots"] == k]) for k in shots]
        last = [r for r in mine if r["shots"] == shots[-1]]
        ran = Counter(r["schedule"] for r in last).most_common(1)[0][0]
        if m == "auto":
            ran = "; ".join(f"{k}: " + "/".join(sorted({r["chose"] for r in mine if r["shots"] == k})) for k in shots)
        rows.append([m, *accs, f"{statistics.mean(r['fit_seconds'] for r in mine):.1f} s", ran])
    note = (f"\n\nShapes world, 9 classes (6 base + 3 novel shapes), test {results['test_per_class']} images per "
            f"class, seeds {', '.join(map(str, seeds))}; validation min(K, 4) per class; budget "
            f"{results['budget']} per fit; options {results.get('options') or 'none'} besides the defaults; CPU, torch "
            f"{results['torch']}, {results['threads']} thread(s). "
            "'ran': views and steps planned / the method's default (cut where the budget did not fit it).")
    return markdown_table(header, rows) + note


def main(argv=None) -> int:
    from fsclip.adapters import AUTO, list_adapters

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    choices = [AUTO, *list_adapters()]
    default = [m for m in ORDER if m in choices] + [m for m in choices if m not in ORDER]
    p.add_argument("--methods", nargs="+", default=default, choices=choices)
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--budget", default=None, help="budget per fit (default: fsclip fit's, 3m on CPU)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for every method run (value read as JSON if it parses); repeatable")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="1 seed, 1 and 4 shots, 10 test images per class, "
                                                        "budget 20s: checks that it runs")
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
        options = {}
        for item in args.option:
            key, _, value = item.partition("=")
            try:
                options[key] = json.loads(value)
            except json.JSONDecodeError:
                options[key] = value
        results = run(args.methods, args.shots, args.seeds, args.test_per_class, args.budget, options)
        if args.save:
            args.save.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
