"""Options and output shared by several subcommands."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from fsclip._paths import display_path
from fsclip.errors import UsageError

DEFAULT_MODEL = os.environ.get("FSCLIP_MODEL", "ViT-B-32@laion2b_s34b_b79k")
RUNTIMES = ("torch", "onnx", "onnx-int8", "auto")  # fsclip.runtime.RUNTIMES, without importing torch here


# argparse `type=` validators: a bad value is a one-line usage error before anything loads
def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, counts, K)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (seeds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """A number in [0, 1] (score thresholds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def parse_options(items: list[str]) -> dict:
    """`--option KEY=VALUE` flags as a dict; each value read as JSON when it parses (`iters=200`,
    `towers="image"` or `towers=image`), else kept as text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def add_model_options(p: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL) -> None:
    p.add_argument("--model", default=default, required=default is None,
                   help=f"model spec: folder, ARCH@TAG, hf-hub:ORG/REPO, ORG/REPO or 'shapes' (default: {default})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="weights/compute dtype (default: fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default: 32)")
    add_runtime_option(p)


def add_runtime_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="torch", choices=RUNTIMES,
                   help="what runs the model: torch; onnx (ONNX Runtime, fp32); onnx-int8 (int8 weights, fastest "
                        "on CPUs); auto (the fastest that passes its accuracy gate on a CPU, torch elsewhere). "
                        "ONNX runtimes are exported and gated once, then cached (default: torch)")


def add_prediction_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-k", type=positive_int, default=5, help="predictions per image (default: 5)")
    p.add_argument("--threshold", type=probability, default=None,
                   help="answer 'unknown' when the best score is below this probability")
    add_output_options(p)


def add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["table", "json", "csv"], default="table",
                   help="table (readable), json (JSON Lines) or csv")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or warnings")


def read_inputs(paths: Iterable[str]) -> list[tuple[Path, str | None]]:
    """The command line's files and folders expanded in order (`fsclip.images.iter_inputs`); a usage error
    when not one image can be read."""
    from fsclip.images import iter_inputs

    entries = list(iter_inputs(paths))
    if not any(reason is None for _, reason in entries):
        what = "; ".join(f"{display_path(p)}: {why}" for p, why in entries[:3]) or "no image files found"
        more = f"; and {len(entries) - 3} more" if len(entries) > 3 else ""
        raise UsageError(f"nothing to classify ({what}{more})")
    return entries


def in_input_order(entries: Iterable[tuple[Path, str | None]], records: Iterator[dict]) -> Iterator[dict]:
    """One record per entry, in order: `records` (one per readable image, in order) with an error record in
    the place of each input that could not be read."""
    for path, reason in entries:
        yield next(records) if reason is None else {"path": display_path(path), "error": reason}


def write_records(records: Iterable[dict], fmt: str, out: TextIO | None = None) -> Iterator[dict]:
    """Stream prediction records to `out` (default stdout) in `fmt`, yielding each one after it is written."""
    out = out or sys.stdout
    writer = None
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(["path", "rank", "label", "score", "error"])
    elif fmt == "table":
        print(f"{'label':<20} {'score':>7}  {'path':<40} others", file=out)
    for rec in records:
        if fmt == "json":
            print(json.dumps(rec, ensure_ascii=False, allow_nan=False), file=out)
        elif fmt == "csv":
            if "error" in rec:
                writer.writerow([rec["path"], "", "", "", rec["error"]])
            for rank, p in enumerate(rec.get("predictions", []), 1):
                writer.writerow([rec["path"], rank, p["label"], f"{p['score']:.6f}", ""])
        else:
            if "error" in rec:
                print(f"{'ERROR':<20} {'':>7}  {rec['path']:<40} {rec['error']}", file=out)
            else:
                top, *rest = rec["predictions"]
                others = ", ".join(f"{p['label']} {p['score']:.2f}" for p in rest)
                print(f"{rec['label']:<20} {top['score']:>7.3f}  {rec['path']:<40} {others}", file=out)
        out.flush()
        yield rec
