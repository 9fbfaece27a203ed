"""`fsclip embed`: embeddings of an image collection as Parquet shards plus a manifest, resumable."""

from __future__ import annotations

import argparse
import json

from fsclip.cli._common import add_model_options, positive_int


def add_parser(sub) -> None:
    from fsclip.embed import DEFAULT_SHARD_SIZE

    p = sub.add_parser(
        "embed", help="embed a collection into Parquet shards (locally or on a Ray cluster)",
        description="Embed every image of SOURCES into OUT: Parquet shards (path, hash, size, mtime_ns, width, "
                    "height, embedding) and manifest.json. Rerunning the same command resumes an interrupted run; "
                    "finished shards are never recomputed.",
    )
    p.add_argument("sources", nargs="+",
                   help="image folders, text files listing paths/URIs (.txt), CSV/Parquet tables with a path, uri "
                        "or url column, s3:// gs:// https:// URIs; relative entries are relative to their list")
    p.add_argument("--out", required=True, help="output folder (created; an existing one is resumed)")
    p.add_argument("--runner", choices=["local", "ray"], default="local",
                   help="local: this process; ray: Ray Data tasks and model actors (default: local)")
    p.add_argument("--shard-size", type=positive_int, default=DEFAULT_SHARD_SIZE,
                   help=f"images per Parquet shard, fixed for the life of --out (default: {DEFAULT_SHARD_SIZE})")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=False,
                   help="store embeddings as float16 (half the bytes; computed in --dtype)")
    p.add_argument("--column", default=None, help="path column of CSV/Parquet sources (default: path, uri or url)")
    add_model_options(p)
    local = p.add_argument_group("local runner")
    local.add_argument("--workers", type=positive_int, default=None, help="image decoding threads (default: up to 4)")
    ray = p.add_argument_group("ray runner")
    ray.add_argument("--address", default=None,
                     help="join this Ray cluster (auto, HOST:6379 or ray://HOST:10001; default: start a local one)")
    ray.add_argument("--num-gpus-per-worker", type=float, default=0.0,
                     help="GPUs per model actor; the pool has one actor per that many GPUs (default: 0, CPU)")
    ray.add_argument("--actors", type=positive_int, default=None,
                     help="model actors (default: one per --num-gpus-per-worker GPUs, else half the cluster's CPUs)")
    p.add_argument("--format", choices=["table", "json"], default="table", help="summary as text or one JSON line")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or warnings")
    p.set_defaults(func=run)


def run(args) -> int:
    from fsclip.embed import embed
    from fsclip.errors import UsageError

    ray_flags = {"--address": args.address, "--num-gpus-per-worker": args.num_gpus_per_worker or None,
                 "--actors": args.actors}
    if args.runner == "local":
        given = [flag for flag, value in ray_flags.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} applies to --runner ray only")
        options = {"workers": args.workers}
    else:
        if args.workers is not None:
            raise UsageError("--workers applies to --runner local only (Ray sizes its decoding tasks itself)")
        options = {"address": args.address, "num_gpus_per_worker": args.num_gpus_per_worker, "actors": args.actors}
    report = embed(args.sources, args.out, args.model, runner=args.runner, shard_size=args.shard_size,
                   fp16=args.fp16, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                   column=args.column, progress=not args.quiet, runtime=args.runtime, **options)
    code = 0 if report.rows or not report.failed else 1  # as classify: 1 when no image could be used
    if args.format == "json":
        print(json.dumps(report.to_dict()))
        return code
    rate = report.embedded / report.seconds if report.seconds > 0 else 0.0
    print(f"{report.out}: {report.rows} images embedded in {report.shards} shards ({report.runner} runner)")
    print(f"  this run: {report.computed} shards, {report.embedded} images ({rate:.0f} img/s); "
          f"{report.resumed} shards finished earlier")
    if report.failed:
        print(f"  {report.failed} file{'s' * (report.failed != 1)} could not be used "
              f"(reasons in {report.out}/manifest.json)")
    print(f"  {report.seconds:.1f} s")
    return code
