"""`fsclip serve`: the search web page and HTTP JSON API for one index."""

from __future__ import annotations

import ipaddress
import sys

from fsclip.cli._common import add_runtime_option


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="web page and JSON API to search an index",
                       description="Serve a search page and JSON API (see fsclip.search.service). "
                                   "Binds to 127.0.0.1 unless told otherwise; only indexed images are served.")
    p.add_argument("index", help="index folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted query image (default: 20)")
    p.add_argument("--model", default=None, help="model spec; must be the index's model (default: the index's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="compute dtype")
    add_runtime_option(p)
    p.set_defaults(func=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    from fsclip.errors import UsageError
    from fsclip.search import ImageIndex
    from fsclip.search.service import build_app

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    if not args.max_upload_mb > 0:
        raise UsageError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    index = ImageIndex.open(args.index, model=args.model, device=args.device, dtype=args.dtype, runtime=args.runtime)
    index.backend  # noqa: B018 - load (and check) the model now, not on the first query
    app = build_app(index, max_upload_bytes=int(args.max_upload_mb * 2**20))
    import uvicorn

    if not _is_loopback(args.host):
        print(f"fsclip: warning: serving on {args.host}: anyone who can reach this machine can search "
              "and view the indexed images", file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"fsclip: serving {args.index} ({len(index)} images) at http://{shown}:{args.port}/  (Ctrl-C to stop)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
