"""`fsclip index build|update|info|remove`: manage a semantic search index folder."""

from __future__ import annotations

import argparse
import csv
import json
import sys

from fsclip._paths import display_path
from fsclip.cli._common import (
    DEFAULT_MODEL,
    add_model_options,
    add_output_options,
    add_runtime_option,
    positive_int,
)


def add_parser(sub) -> None:
    p = sub.add_parser("index", help="build, update and inspect an image search index",
                       description="Manage a search index: one folder with vectors, metadata and a FAISS index.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    b = actions.add_parser("build", help="create an index (or resume/extend one) from image folders",
                           description="Embed every image under PATHS into INDEX. Re-running the same command "
                                       "resumes an interrupted build, or indexes what changed since.")
    b.add_argument("paths", nargs="+", help="image files and/or folders (walked recursively)")
    b.add_argument("--index", required=True, help="index folder to create or extend, e.g. photos.idx")
    add_model_options(b)
    b.set_defaults(model=None)  # an existing index keeps its own model
    b.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an existing index instead of extending it")
    b.add_argument("--ann-threshold", type=positive_int, default=None,
                   help="use an approximate (IVF) index from this many images on (default: 50000; new index only)")
    _add_run_options(b)
    b.set_defaults(func=run_build)

    u = actions.add_parser("update", help="index new and changed files, drop deleted ones",
                           description="Re-scan the index's folders: new and changed files are embedded, "
                                       "deleted ones removed, moved/renamed ones (same content) reuse their vectors.")
    u.add_argument("index", help="index folder")
    u.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    u.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="compute dtype")
    u.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default: 32)")
    add_runtime_option(u)
    _add_run_options(u)
    u.set_defaults(func=run_update)

    i = actions.add_parser("info", help="show what an index holds, and its bad files",
                           description="Model, size, index type and bad (skipped) files of an index.")
    i.add_argument("index", help="index folder")
    i.add_argument("--format", choices=["table", "json"], default="table", help="table (readable) or json")
    i.set_defaults(func=run_info)

    r = actions.add_parser("remove", help="remove files or folders from an index",
                           description="Remove entries; removed paths stay out on later updates "
                                       "(`index build` with the path brings it back).")
    r.add_argument("index", help="index folder")
    r.add_argument("paths", nargs="+", help="indexed files, or folders to remove everything under")
    r.set_defaults(func=run_remove)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=positive_int, default=None, help="image decoding threads (default: up to 4)")
    add_output_options(p)


def _print_report(index_path, report, fmt: str) -> None:
    d = {"index": display_path(index_path), **report.to_dict()}
    d["missing_roots"] = [display_path(r) for r in d["missing_roots"]]
    if fmt == "json":
        print(json.dumps(d))
        return
    d["unreadable"] = [{**u, "path": display_path(u["path"])} for u in d["unreadable"]]
    if fmt == "csv":
        d["missing_roots"] = ";".join(d["missing_roots"])
        d["unreadable"] = ";".join(u["path"] for u in d["unreadable"])
        writer = csv.DictWriter(sys.stdout, fieldnames=list(d))
        writer.writeheader()
        writer.writerow(d)
        return
    rate = report.embedded / report.seconds if report.seconds > 0 else 0.0
    print(f"{index_path}: {report.total} images searchable ({report.kind} index)")
    print(f"  embedded {report.embedded} ({rate:.0f} img/s), reused {report.reused} by content, "
          f"unchanged {report.unchanged}, resumed {report.resumed}, removed {report.removed}")
    if report.failed or report.known_bad:
        print(f"  bad files: {report.failed} new, {report.known_bad} known (see `fsclip index info {index_path}`)")
    for root in report.missing_roots:
        print(f"  missing folder kept as is: {display_path(root)}")
    for folder, reason in report.unreadable:
        print(f"  unreadable folder kept as is: {display_path(folder)} ({reason})")
    print(f"  {report.seconds:.1f} s")


def run_build(args) -> int:
    from pathlib import Path

    from fsclip.search import AnnConfig, ImageIndex
    from fsclip.search._scan import check_root

    path = Path(args.index)
    for p in args.paths:  # before creating anything: a typo must not leave an empty index behind
        check_root(p)
    if path.exists() and not args.overwrite:
        index = ImageIndex.open(path, model=args.model, device=args.device, dtype=args.dtype, runtime=args.runtime)
        if args.ann_threshold is not None and args.ann_threshold != index.ann.ann_threshold:
            print(f"fsclip: warning: --ann-threshold ignored; {path} keeps {index.ann.ann_threshold} "
                  "(use --overwrite to rebuild)", file=sys.stderr)
    else:
        ann = AnnConfig() if args.ann_threshold is None else AnnConfig(ann_threshold=args.ann_threshold)
        index = ImageIndex.create(path, args.model or DEFAULT_MODEL, ann=ann, overwrite=args.overwrite,
                                  device=args.device, dtype=args.dtype, runtime=args.runtime, calibration=args.paths)
    with index:
        report = index.add(args.paths, batch_size=args.batch_size, num_workers=args.workers,
                           progress=not args.quiet)
    _print_report(path, report, args.format)
    return 0


def run_update(args) -> int:
    from fsclip.search import ImageIndex

    with ImageIndex.open(args.index, device=args.device, dtype=args.dtype, runtime=args.runtime) as index:
        report = index.update(batch_size=args.batch_size, num_workers=args.workers, progress=not args.quiet)
    _print_report(args.index, report, args.format)
    return 0


def run_info(args) -> int:
    from fsclip.search import ImageIndex

    with ImageIndex.open(args.index) as index:
        info = index.info()
        errors = [{**e, "path": display_path(e["path"])} for e in index.errors()]
    for key in ("roots", "excluded"):
        info[key] = [display_path(p) for p in info[key]]
    if args.format == "json":
        print(json.dumps({**info, "errors": errors}))
        return 0
    kind = info["index"]["kind"]
    if kind == "ivf":
        kind += (f" (nlist {info['index']['nlist']}, nprobe {info['index']['nprobe']}, "
                 f"recall@10 {info['index']['tuned_recall_at_10']:.3f} on sample queries)")
    rows = [
        ("index", display_path(info["path"])), ("images", info["images"]), ("model", info["model"]),
        ("backend", info["backend"]), ("runtime", info["runtime"]), ("fingerprint", info["fingerprint"]),
        ("dim", info["dim"]),
        ("queries", "text and image" if info["has_text"] else "image only (the model has no text tower)"),
        ("search", kind), ("approximate from", f"{info['ann_threshold']} images"),
        ("generation", info["generation"]), ("updated", info["updated"]),
        ("disk", f"{info['disk_bytes'] / 2**20:.1f} MiB"), ("roots", ", ".join(info["roots"]) or "-"),
    ]
    if info["excluded"]:
        rows.append(("excluded", ", ".join(info["excluded"])))
    if info["damaged"]:
        rows.append(("damaged", info["damaged"].removeprefix("index damaged: ")))
    if info["pending"]:
        rows.append(("pending", f"{info['pending']} images from an interrupted build; "
                                f"run `fsclip index update {args.index}` to finish"))
    rows.append(("bad files", info["bad_files"]))
    for key, value in rows:
        print(f"{key + ':':<18}{value}")
    for e in errors:
        print(f"  {e['path']}: {e['reason']}")
    return 0


def run_remove(args) -> int:
    from fsclip.search import ImageIndex

    with ImageIndex.open(args.index) as index:
        n = index.remove(args.paths)
        left = len(index)
    if n == 0:
        print(f"fsclip: warning: nothing in {args.index} matched {', '.join(args.paths)}", file=sys.stderr)
        return 1
    print(f"removed {n} image{'s' * (n != 1)} from {args.index}; {left} left")
    return 0
