"""`fsclip predict`: classify images with a fitted adapter (same output as `fsclip classify`)."""

from __future__ import annotations

from pathlib import Path

from fsclip.cli._common import (
    add_prediction_options,
    add_runtime_option,
    in_input_order,
    positive_int,
    read_inputs,
    write_records,
)


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
                   help="weights dtype (default: fp32 on CPU, fp16 on CUDA, whatever the adapter was fitted in)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default: 32)")
    add_runtime_option(p)
    add_prediction_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from fsclip.adapters import get_adapter, load_adapter
    from fsclip.adapters.base import read_header
    from fsclip.backends import load_model
    from fsclip.errors import UsageError
    from fsclip.predict import predict_records

    header = read_header(args.adapter)  # a missing or damaged adapter folder is reported before anything else loads
    if args.runtime != "torch" and not get_adapter(header["method"]).frozen_backbone:
        raise UsageError(f"a {header['method']} adapter trains the towers, so it predicts with --runtime torch "
                         "(or fit it with --merge DIR, and use --model DIR with any runtime)")
    entries = read_inputs(args.paths)
    paths = [p for p, reason in entries if reason is None]
    backend = None
    if args.model or args.runtime != "torch":
        backend = load_model(args.model or header["base_model"]["spec"], device=args.device, dtype=args.dtype,
                             runtime=args.runtime, calibration=paths)
    adapter = load_adapter(args.adapter, backend=backend, device=args.device, dtype=args.dtype)
    records = predict_records(
        adapter.backend, paths, adapter.proba_from_features, adapter.classes, args.top_k, args.threshold,
        args.batch_size, progress=not args.quiet,
    )
    ok = sum("error" not in rec for rec in write_records(in_input_order(entries, records), args.format))
    return 0 if ok else 1
