"""`fsclip search`: query an index by text and/or example images, with metadata filters."""

from __future__ import annotations

import csv
import json
import math
import sys

from fsclip.cli._common import add_runtime_option


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="search an index by text or example image",
                       description='Rank indexed images, e.g. fsclip search my.idx "a red car at night" -k 20. '
                                   "Several positives are averaged; --minus queries are subtracted.")
    p.add_argument("index", help="the index: a folder, PATH.db or milvus://HOST:PORT/COLLECTION (from `fsclip index build`)")
    p.add_argument("text", nargs="?", help="text query")
    p.add_argument("--query", action="append", default=[], metavar="TEXT", help="another text query; repeatable")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="example image (indexed or not); repeatable")
    p.add_argument("--minus", action="append", default=[], metavar="TEXT",
                   help="text the results should be unlike; repeatable")
    p.add_argument("--minus-image", action="append", default=[], metavar="PATH",
                   help="image the results should be unlike; repeatable")
    p.add_argument("--negative-weight", type=float, default=0.5,
                   help="weight of the --minus queries (default: 0.5)")
    p.add_argument("-k", "--top-k", dest="k", type=int, default=10, help="number of results (default: 10)")
    f = p.add_argument_group("filters")
    f.add_argument("--glob", help='path pattern; * also matches "/", e.g. "*/2023/*" or "*.jpg"')
    f.add_argument("--prefix", help="path prefix, e.g. a folder (relative paths are made absolute)")
    f.add_argument("--after", help="modified at or after: YYYY-MM-DD[THH:MM[:SS]] or epoch seconds")
    f.add_argument("--before", help="modified before: YYYY-MM-DD[THH:MM[:SS]] or epoch seconds")
    for side in ("min", "max"):
        for dim in ("width", "height"):
            f.add_argument(f"--{side}-{dim}", type=int, help=f"{side}imum image {dim} in pixels")
    p.add_argument("--model", default=None, help="model spec; must be the index's model (default: the index's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="compute dtype")
    add_runtime_option(p)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table",
                   help="table (readable), json (JSON Lines) or csv")
    p.add_argument("-q", "--quiet", action="store_true", help="no warnings")
    p.set_defaults(func=run)


def _where(args):
    from fsclip.errors import UsageError
    from fsclip.search import Where
    from fsclip.search._scan import normpath
    from fsclip.search.query import check_glob, parse_time

    if args.prefix is not None and not args.prefix:
        raise UsageError("--prefix is empty; give a path prefix such as a folder (--prefix ~/Photos/2023/)")
    if args.glob is not None:
        if not args.glob:
            raise UsageError("--glob is empty; give a pattern such as '*.jpg' or '*/2023/*'")
        check_glob(args.glob, "--glob")
    return Where(
        path_glob=args.glob,
        path_prefix=None if args.prefix is None else normpath(args.prefix) + ("/" if args.prefix.endswith("/") else ""),
        modified_after=None if args.after is None else parse_time(args.after, "--after"),
        modified_before=None if args.before is None else parse_time(args.before, "--before"),
        min_width=args.min_width, max_width=args.max_width, min_height=args.min_height, max_height=args.max_height,
    )


def run(args) -> int:
    from fsclip._paths import display_path
    from fsclip.errors import UsageError
    from fsclip.search import ImageIndex
    from fsclip.search.index import MAX_K

    texts = ([args.text] if args.text is not None else []) + args.query
    if not texts and not args.image:
        raise UsageError("nothing to search for: give a text query, --query TEXT or --image PATH")
    # every flag is checked before the index's model loads (seconds to minutes for a large model)
    if not 1 <= args.k <= MAX_K:
        raise UsageError(f"-k must be an integer from 1 to {MAX_K}, got {args.k}")
    if not (math.isfinite(args.negative_weight) and args.negative_weight >= 0):
        raise UsageError(f"--negative-weight must be a number >= 0, got {args.negative_weight}")
    where = _where(args)
    with ImageIndex.open(args.index, model=args.model, device=args.device, dtype=args.dtype,
                         runtime=args.runtime) as index:
        hits = index.search(text=texts, image=args.image, negative_text=args.minus,
                            negative_image=args.minus_image, negative_weight=args.negative_weight,
                            k=args.k, where=where)
    if args.format == "json":
        for h in hits:
            print(json.dumps({"path": display_path(h.path), "score": round(h.score, 6)}, ensure_ascii=False))
    elif args.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(["rank", "score", "path"])
        for rank, h in enumerate(hits, 1):
            w.writerow([rank, f"{h.score:.6f}", display_path(h.path)])
    else:
        print(f"{'rank':>4} {'score':>7}  path")
        for rank, h in enumerate(hits, 1):
            print(f"{rank:>4} {h.score:>7.4f}  {display_path(h.path)}")
    if not hits and not args.quiet:
        print("fsclip: no results (empty index, or no image matches the filters)", file=sys.stderr)
    return 0
