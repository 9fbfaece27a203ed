"""`fsclip index build|update|info|remove`: manage a semantic search index."""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys

from fsclip._paths import display_path
from fsclip.cli._common import (
    DEFAULT_MODEL,
    add_model_options,
    add_output_options,
    add_runtime_option,
    positive_int,
)

LOCATION_HELP = ("a folder (FAISS, the default), PATH.db (embedded Milvus Lite) or milvus://HOST:PORT/COLLECTION "
                 "(a Milvus server; pip install 'fsclip[milvus]')")
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


def byte_size(text: str) -> int:
    """A memory size: bytes, or with a binary unit (512M = 512 MiB; K, M, G, T, optionally iB/B)."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise argparse.ArgumentTypeError(f"must be a size such as 800M or 4G, got {text!r}")
    value = int(float(m[1]) * _UNITS[m[2].lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("index", help="build, update and inspect an image search index",
                       description="Manage a search index: vectors, file metadata and an ANN index, in a folder "
                                   "(FAISS) or a Milvus collection.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    b = actions.add_parser("build", help="create an index (or resume/extend one) from image folders",
                           description="Embed every image under PATHS into INDEX (or load `fsclip embed` output "
                                       "with --from-embeddings). Re-running the same command resumes an "
                                       "interrupted build, or indexes what changed since.")
    b.add_argument("paths", nargs="*", help="image files and/or folders (walked recursively)")
    b.add_argument("--index", required=True, help=f"where the index lives: {LOCATION_HELP}")
    b.add_argument("--from-embeddings", metavar="DIR",
                   help="load the shards of an `fsclip embed --out DIR` run (nothing re-encoded); with PATHS, "
                        "those folders are then scanned as usual and only what the shards lack is embedded")
    add_model_options(b)
    b.set_defaults(model=None)  # an existing index keeps its own model
    b.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an existing index instead of extending it")
    b.add_argument("--ann-threshold", type=positive_int, default=None,
                   help="use an approximate (IVF) index from this many images on (default: 50000; new index only)")
    _add_memory_option(b)
    _add_run_options(b)
    b.set_defaults(func=run_build)

    u = actions.add_parser("update", help="index new and changed files, drop deleted ones",
                           description="Re-scan the index's folders: new and changed files are embedded, "
                                       "deleted ones removed, moved/renamed ones (same content) reuse their vectors.")
    u.add_argument("index", help="the index (folder, PATH.db or milvus://...)")
    u.add_argument("--from-embeddings", metavar="DIR",
                   help="load the shards of an `fsclip embed --out DIR` run first (nothing re-encoded), then "
                        "re-scan the folders as usual")
    u.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    u.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="compute dtype")
    u.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default: 32)")
    add_runtime_option(u)
    _add_memory_option(u)
    _add_run_options(u)
    u.set_defaults(func=run_update)

    i = actions.add_parser("info", help="show what an index holds, and its bad files",
                           description="Model, size, index type and bad (skipped) files of an index.")
    i.add_argument("index", help="the index (folder, PATH.db or milvus://...)")
    i.add_argument("--format", choices=["table", "json"], default="table", help="table (readable) or json")
    i.set_defaults(func=run_info)

    r = actions.add_parser("remove", help="remove files or folders from an index",
                           description="Remove entries; removed paths stay out on later updates "
                                       "(`index build` with the path brings it back).")
    r.add_argument("index", help="the index (folder, PATH.db or milvus://...)")
    r.add_argument("paths", nargs="+", help="indexed files, or folders to remove everything under")
    r.set_defaults(func=run_remove)


def _add_memory_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", type=byte_size, default=None, metavar="SIZE",
                   help="memory the FAISS index may take, e.g. 800M or 16G (binary units): past it, vectors are "
                        "stored compressed (IVF-SQ8, IVF-PQ) and the top candidates re-scored exactly from disk, "
                        "still tuned to recall@10 >= 0.95 (default: no limit; kept by the index)")


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
    if report.loaded:
        print(f"  loaded {report.loaded} from embeddings")
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
    from fsclip.errors import UsageError
    from fsclip.search import AnnConfig, ImageIndex
    from fsclip.search._scan import check_root

    if not args.paths and not args.from_embeddings:
        raise UsageError("nothing to index: give image folders, or --from-embeddings DIR (or both)")
    for p in args.paths:  # before creating anything: a typo must not leave an empty index behind
        check_root(p)
    manifest = _manifest(args.from_embeddings) if args.from_embeddings else None
    location = args.index
    if ImageIndex.exists(location) and not args.overwrite:
        index = ImageIndex.open(location, model=args.model, device=args.device, dtype=args.dtype, runtime=args.runtime)
        if args.ann_threshold is not None and args.ann_threshold != index.ann.ann_threshold:
            print(f"fsclip: warning: --ann-threshold ignored; {location} keeps {index.ann.ann_threshold} "
                  "(use --overwrite to rebuild)", file=sys.stderr)
        if args.max_memory is not None and args.max_memory != index.ann.max_memory:
            index.set_max_memory(args.max_memory)
    else:
        ann = AnnConfig(**{k: v for k, v in (("ann_threshold", args.ann_threshold), ("max_memory", args.max_memory))
                           if v is not None})
        model = args.model or DEFAULT_MODEL
        if manifest is not None:
            model = _embedded_model(manifest, args)
        index = ImageIndex.create(location, model, ann=ann, overwrite=args.overwrite, device=args.device,
                                  dtype=args.dtype, runtime=args.runtime, calibration=args.paths)
    with index:
        if manifest is not None:
            report = index.load_embeddings(args.from_embeddings, paths=args.paths, batch_size=args.batch_size,
                                           num_workers=args.workers, progress=not args.quiet)
        else:
            report = index.add(args.paths, batch_size=args.batch_size, num_workers=args.workers,
                               progress=not args.quiet)
    _print_report(location, report, args.format)
    return 0


def _manifest(folder: str) -> dict:
    from fsclip.embed import read_manifest
    from fsclip.errors import DataError

    manifest = read_manifest(folder)
    if manifest.get("status") != "complete":
        raise DataError(f"{folder} is an unfinished `fsclip embed` run; rerun the same command to finish it")
    return manifest


def _embedded_model(manifest: dict, args):
    """The model a new index built from embeddings records: the manifest's (nothing loads), or --model
    when it names the same weights."""
    from fsclip.backends import load_model
    from fsclip.errors import UsageError

    record = manifest["model"]
    if args.model is None:
        return record
    backend = load_model(args.model, device=args.device, dtype=args.dtype, runtime=args.runtime)
    if not backend.matches_fingerprint(record["fingerprint"]) or backend.embed_dim != int(record["dim"]):
        raise UsageError(f"--model {args.model} (fingerprint {backend.fingerprint}) is not the model of "
                         f"{args.from_embeddings} ({record['spec']}, fingerprint {record['fingerprint']}); "
                         "omit --model to use the embeddings' model")
    return backend


def run_update(args) -> int:
    from fsclip.search import ImageIndex

    manifest = _manifest(args.from_embeddings) if args.from_embeddings else None
    with ImageIndex.open(args.index, device=args.device, dtype=args.dtype, runtime=args.runtime) as index:
        if args.max_memory is not None and args.max_memory != index.ann.max_memory:
            index.set_max_memory(args.max_memory)
        if manifest is not None:  # the shards first, then the usual scan finds little left to embed
            from fsclip.search.update import combine

            load = index.load_embeddings(args.from_embeddings, progress=not args.quiet)
            report = combine(load, index.update(batch_size=args.batch_size, num_workers=args.workers,
                                                progress=not args.quiet))
        else:
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
    rows = [
        ("index", display_path(info["path"])), ("engine", info["engine"]), ("images", info["images"]),
        ("model", info["model"]), ("backend", info["backend"]), ("runtime", info["runtime"]),
        ("fingerprint", info["fingerprint"]), ("dim", info["dim"]),
        ("queries", "text and image" if info["has_text"] else "image only (the model has no text tower)"),
        ("search", _describe_search(info["index"])), ("approximate from", f"{info['ann_threshold']} images"),
    ]
    if info["max_memory"]:
        rows.append(("memory budget", f"{info['max_memory'] / 2**20:.0f} MiB"))
    rows += [("generation", info["generation"]), ("updated", info["updated"])]
    if info["disk_bytes"] is not None:
        rows.append(("disk", f"{info['disk_bytes'] / 2**20:.1f} MiB"))
    rows.append(("roots", ", ".join(info["roots"]) or "-"))
    if info["excluded"]:
        rows.append(("excluded", ", ".join(info["excluded"])))
    if info["damaged"]:
        rows.append(("damaged", info["damaged"].removeprefix("index damaged: ")))
    if info["pending"]:
        rows.append(("pending", f"{info['pending']} images from an interrupted build; "
                                f"run `fsclip index update {args.index}` to finish"))
    rows.append(("bad files", "unknown (no catalog here)" if info["bad_files"] is None else info["bad_files"]))
    for key, value in rows:
        print(f"{key + ':':<18}{value}")
    for e in errors:
        print(f"  {e['path']}: {e['reason']}")
    return 0


def _describe_search(index: dict) -> str:
    kind = index["kind"]
    if kind == "flat":
        text = "flat (exact)"
    else:
        rerank = f", rerank {index['rerank']}x" if index.get("rerank") else ""
        text = (f"{kind} (nlist {index['nlist']}, nprobe {index['nprobe']}{rerank}, recall@10 "
                f"{index['tuned_recall_at_10']:.3f} on sample queries)")
    if index.get("delta") or index.get("tombstones"):
        text += f"; {index['delta']} added and {index['tombstones']} removed since its last merge"
    return text


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
