"""Does every method's default fit end within the default CPU budget on a ViT-B/32-size model?

    python -m eval.fewshot_budget [--classes 10] [--shots 16] [--budget 3m] [--methods ...]
    python -m eval.fewshot_budget --quick      # 3 classes x 2 shots, budget 20s, two methods: checks it runs

`fsclip fit` with each method and its defaults (`auto` included) on the ViT-B-32 architecture with
random weights (nothing is downloaded; the compute is the real model's) and synthetic 224 px JPEGs:
`classes` x `shots` training images and 4 validation images per class, a fresh feature cache per
method (the worst case: nothing encoded before). Prints a Markdown table: wall-clock seconds of the
whole `fit` call against the budget, and the schedule each method ran (planned / its default).
Timing figures: run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from eval._timing import markdown_table

SPEC = "open_clip:ViT-B-32"  # architecture only: random weights, nothing downloaded
METHODS = ("auto", "clap", "coop", "linear-probe", "tip-adapter", "tip-adapter-f", "prolip", "lora", "partial-ft",
           "full-ft")


def write_images(folder: Path, classes: int, per_class: int, size: int = 224, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (folder / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
            Image.fromarray(arr).resize((size, size), Image.BILINEAR).save(folder / f"class_{c}" / f"{i}.jpg")


def _ran(adapter) -> str:
    sel = adapter.selection
    train = getattr(adapter, "train_result", {}).get("schedule") or sel.get("training")
    parts = [f"{label} {plan['planned']}/{plan['default']}" for label, plan in (("views", sel.get("views")),
                                                                                 ("steps", train))
             if isinstance(plan, dict) and plan.get("planned") is not None]
    return ", ".join(parts) or "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--budget", default="3m")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="3 classes x 2 shots, budget 20s, auto and clap")
    args = p.parse_args(argv)
    if args.quick:
        args.classes, args.shots, args.budget, args.methods = 3, 2, "20s", ["auto", "clap"]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root / "train", args.classes, args.shots)
        write_images(root / "val", args.classes, 4, seed=1)
        for method in args.methods:
            os.environ["FSCLIP_CACHE"] = str(root / f"cache-{method}")  # cold: every image encoded in the fit
            from fsclip.adapters import fit, parse_duration
            from fsclip.backends import load_model
            from fsclip.data import load_image_folder

            backend = load_model(SPEC, device="cpu")
            train = load_image_folder(root / "train")
            val = load_image_folder(root / "val", list(train.classes))
            t0 = time.perf_counter()
            adapter = fit(backend, train, method, val=val, templates="generic", budget=args.budget)
            seconds = time.perf_counter() - t0
            limit = parse_duration(args.budget)
            rows.append([method if adapter.name == method else f"{method} ({adapter.name})", f"{seconds:.0f} s",
                         f"{limit:.0f} s", "yes" if seconds <= limit else "NO", _ran(adapter)])
            print(" | ".join(rows[-1]), flush=True)
    print(markdown_table(["method", "fit wall time", "budget", "within", "ran (planned/default)"], rows))
    print(f"\n{SPEC} (random weights), {args.classes} classes x {args.shots} shots + 4 validation images per "
          f"class, 224 px JPEGs, cold feature cache; CPU, torch {torch.__version__}, {torch.get_num_threads()} "
          "thread(s).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
