"""`fsclip serve`: the search web page and HTTP JSON API for one index."""

from __future__ import annotations

import ipaddress
import socket
import sys

from fsclip.cli._common import add_runtime_option


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="web page and JSON API to search an index",
                       description="Serve a search page and JSON API (see fsclip.search.service). "
                                   "Binds to 127.0.0.1 unless told otherwise; only indexed images are served.")
    p.add_argument("index", help="the index: a folder, PATH.db or milvus://HOST:PORT/COLLECTION")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also accept requests addressed to this host name (Host header); repeatable. "
                        "Default: localhost, 127.0.0.1, [::1] and --host. '*' accepts any name "
                        "(opens the server to DNS rebinding)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted query image (default: 20)")
    p.add_argument("--model", default=None, help="model spec; must be the index's model (default: the index's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="compute dtype")
    add_runtime_option(p)
    p.set_defaults(func=run)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _is_loopback(host: str) -> bool:
    ip = _ip(host)
    return host == "localhost" or (ip is not None and ip.is_loopback)


def _host_name(host: str) -> str:
    """`host` as it appears in a Host header: IPv6 literals in brackets."""
    ip = _ip(host)
    return f"[{ip}]" if ip is not None and ip.version == 6 else host.lower()


def allowed_hosts(host: str, extra: list[str]) -> list[str]:
    """Host header names to accept: loopback names, the bound host, this machine's names on a wildcard bind."""
    from fsclip.search.service import LOCAL_HOSTS

    names = [*LOCAL_HOSTS, _host_name(host)]
    ip = _ip(host)
    if ip is not None and ip.is_unspecified:  # 0.0.0.0 / ::, reached by this machine's names
        names += [socket.gethostname().lower(), socket.getfqdn().lower()]
    names += [_host_name(h) for h in extra]
    return list(dict.fromkeys(n for n in names if n))


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before anything is announced (so the printed address is the real one)."""
    from fsclip.errors import UsageError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if _ip(host) and _ip(host).is_unspecified else 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def run(args) -> int:
    from fsclip.errors import UsageError
    from fsclip.search import ImageIndex
    from fsclip.search.service import build_app

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    if not args.max_upload_mb > 0:
        raise UsageError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    for name in args.allow_host:
        if not name or (name != "*" and ("*" in name[1:] or (name.startswith("*") and not name.startswith("*.")))):
            raise UsageError(f"--allow-host takes a host name, '*.example.com' or '*', got {name!r}")
    hosts = ["*"] if "*" in args.allow_host else allowed_hosts(args.host, args.allow_host)
    sock = _listen(args.host, args.port)  # before loading anything: a busy port fails at once
    try:
        index = ImageIndex.open(args.index, model=args.model, device=args.device, dtype=args.dtype,
                                runtime=args.runtime)
        index.backend  # noqa: B018 - load (and check) the model now, not on the first query
        app = build_app(index, max_upload_bytes=int(args.max_upload_mb * 2**20), allowed_hosts=hosts)
        import uvicorn

        if not _is_loopback(args.host):
            print(f"fsclip: warning: serving on {args.host}: anyone who can reach this machine can search "
                  f"and view the indexed images (accepted host names: {', '.join(hosts)})", file=sys.stderr)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"fsclip: serving {args.index} ({len(index)} images) at http://{shown}:{port}/  (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        sock.close()
    return 0
