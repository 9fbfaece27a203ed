"""`fsclip predict`: classify images with a fitted adapter (same output as `fsclip classify`)."""

from __future__ import annotations

import sys
from itertools import chain
from pathlib import Path

from fsclip.cli._common import add_prediction_options, add_runtime_option, write_records


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify images with an adapter from `fsclip fit`",
                       description="Classify images with a fitted adapter; probabilities are calibrated, so "
                                   "--threshold abstains ('unknown') where the adapter is unsure.")
    p.add_argument("paths", nargs="+", help="image files and/or folders (walked recursively)")
    p.add_argument("--adapter", type=Path, required=True, help="adapter folder written by `fsclip fit`")
    p.add_argument("--model", default=None,
                   help="base model spec, if it moved since fitting (default: the one recorded in the adapter)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="weights dtype (default: the one the adapter was fitted with)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    add_runtime_option(p)
    add_prediction_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from fsclip.adapters import get_adapter, load_adapter
    from fsclip.adapters.base import read_header
    from fsclip.backends import load_model
    from fsclip.errors import UsageError
    from fsclip.images import find_images
    from fsclip.predict import predict_records

    paths, missing = find_images(args.paths)
    if not paths:
        what = "; ".join(f"{p}: {why}" for p, why in missing) or "no image files found"
        print(f"fsclip: error: nothing to classify ({what})", file=sys.stderr)
        return 2
    dtype = None if args.dtype == "auto" else args.dtype
    header = read_header(args.adapter)
    if args.runtime != "torch" and not get_adapter(header["method"]).frozen_backbone:
        raise UsageError(f"a {header['method']} adapter trains the towers, so it predicts with --runtime torch "
                         "(or fit it with --merge DIR, and use --model DIR with any runtime)")
    backend = None
    if args.model or args.runtime != "torch":
        # the weights' fingerprint depends on their dtype: default to the one the adapter was fitted with
        base = header["base_model"]
        backend = load_model(args.model or base["spec"], device=args.device, dtype=dtype or base.get("dtype"),
                             runtime=args.runtime, calibration=paths)
    adapter = load_adapter(args.adapter, backend=backend, device=args.device, dtype=dtype)
    records = predict_records(
        adapter.backend, paths, adapter.proba_from_features, adapter.classes, args.top_k, args.threshold,
        args.batch_size, progress=not args.quiet,
    )
    missing_records = [{"path": str(p), "error": why} for p, why in missing]
    ok = sum("error" not in rec for rec in write_records(chain(missing_records, records), args.format))
    return 0 if ok else 1
