"""The evaluation harness on the shapes world, end to end, offline: the committed results table and plots.

    python -m eval.shapes_results [--threads 1] [--lora-iters 200] [--lora-lr 5e-3]

Runs, through the `fsclip eval` command line (exactly what a user would type):
- zero-shot on shapes-compositional (48 colour x shape names; 8 combinations never named together in pretraining) and on
  shapes-novel (9 shapes; diamond, crescent and ring never seen in pretraining);
- the CoOp few-shot protocol on shapes-novel: K = 1, 2, 4, 8, 16 shots x seeds 1, 2, 3 for the
  frozen-feature methods (linear probe, Tip-Adapter, Tip-Adapter-F) and for LoRA on a compressed
  schedule (200 steps at lr 5e-3 instead of CLIP-LoRA's 500 steps per shot at 2e-4, which takes
  minutes per fit on a CPU; --lora-iters 0 skips it);
- retrieval on shapes-captions (48 images, 5 captions each);
then `fsclip eval report` into eval/results/shapes/ (report.md, results.csv, PNG plots). Datasets and
the feature cache go to eval/results/tmp/ (git-ignored); runs already in eval/results/shapes/runs/ are
kept (--skip-existing), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "shapes"
TMP = HERE / "results" / "tmp"
FROZEN = ("linear-probe", "tip-adapter", "tip-adapter-f")


def commands(runs: Path, data: Path, shots: list[int], seeds: list[int], lora_iters: int,
             lora_lr: float) -> list[list[str]]:
    common = ["--model", "shapes", "--device", "cpu", "--root", str(data), "--out", str(runs), "--skip-existing"]
    few = ["--shots", *map(str, shots), "--seeds", *map(str, seeds)]
    out = [
        ["eval", "zeroshot", "--dataset", "shapes-compositional", *common],
        ["eval", "zeroshot", "--dataset", "shapes-novel", *common],
        ["eval", "fewshot", "--dataset", "shapes-novel", *[a for m in FROZEN for a in ("--method", m)], *few, *common],
        ["eval", "retrieval", "--dataset", "shapes-captions", *common],
    ]
    if lora_iters:  # LoRA trains the towers: minutes per fit on a CPU with its own schedule
        out.append(["eval", "fewshot", "--dataset", "shapes-novel", "--method", "lora", "--option",
                    f"iters={lora_iters}", "--option", f"lr={lora_lr:g}", *few, *common])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT, help=f"report folder (default: {OUT})")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--lora-iters", type=int, default=200, help="LoRA steps per fit (0: no LoRA runs)")
    p.add_argument("--lora-lr", type=float, default=5e-3, help="LoRA learning rate (default: 5e-3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)

    os.environ.setdefault("FSCLIP_CACHE", str(TMP / "cache"))  # before fsclip reads it
    import torch

    from fsclip.cli import main as fsclip

    if args.threads:
        torch.set_num_threads(args.threads)
    runs = args.out / "runs"
    t0 = time.perf_counter()
    for argv_ in commands(runs, TMP / "data", args.shots, args.seeds, args.lora_iters, args.lora_lr):
        print("$ fsclip " + " ".join(argv_), file=sys.stderr, flush=True)
        code = fsclip([*argv_, "-q"])
        if code:
            return code
    code = fsclip(["eval", "report", str(runs), "--out", str(args.out)])
    print(f"shapes results in {args.out}/ ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
