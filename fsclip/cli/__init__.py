"""`fsclip` command line: one module per subcommand, each exposing `add_parser(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fsclip._version import __version__
from fsclip.errors import FsclipError

__all__ = ["main"]

# Subcommand modules under fsclip/cli/, in --help order.
COMMANDS = ("classify", "fit", "predict", "index", "search", "serve", "embed", "eval", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsclip", description="Zero-shot, few-shot and search with CLIP models.")
    parser.add_argument("--version", action="version", version=f"fsclip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"fsclip.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"fsclip.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fsclip: %(levelname)s: %(message)s"))
    if not args.verbose:  # other libraries' chatter (retries, load reports) only with --verbose
        handler.addFilter(lambda record: record.name.startswith("fsclip"))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR if quiet else logging.WARNING,
        handlers=[handler],
        force=True,
    )
    try:
        return int(args.func(args) or 0)
    except FsclipError as e:
        print(f"fsclip: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fsclip: interrupted", file=sys.stderr)
        return 130
