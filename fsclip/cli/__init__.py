"""`fsclip` command line: one module per subcommand, each exposing `add_parser(subparsers)`."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys

from fsclip._version import __version__
from fsclip.distributed import world
from fsclip.errors import FsclipError, UsageError

__all__ = ["main"]

# Subcommand modules under fsclip/cli/, in --help order.
COMMANDS = ("classify", "fit", "predict", "index", "search", "serve", "embed", "eval", "demo")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is the one line every fsclip error is: `fsclip: error: ...`, exit 2."""

    def error(self, message: str):
        self.exit(2, f"fsclip: error: {message} (see '{self.prog} --help')\n")

    def parse_args(self, args=None, namespace=None):
        # argparse reports leftovers from the top parser; name the help of the command that got them
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            prog = getattr(ns, "_prog", self.prog)
            self.exit(2, f"fsclip: error: unrecognized arguments: {' '.join(extras)} (see '{prog} --help')\n")
        return ns


def _name_commands(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command parser records its own prog, for the usage error above, and takes -v too
    (`fsclip fit ... -v` as well as `fsclip -v fit ...`; unset there, it leaves the top level's value)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.set_defaults(_prog=child.prog)
                if not any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
                    child.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                       help="log progress details to stderr")
                _name_commands(child)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fsclip", description="Zero-shot, few-shot and search with CLIP models.")
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
    _name_commands(parser)
    return parser


def _quiet_stdout() -> None:
    """After a broken pipe (`fsclip ... | head`): point stdout at /dev/null, so the interpreter's final
    flush cannot raise again (the recipe in Python's signal documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor behind stdout (e.g. captured in tests)
        pass


@contextlib.contextmanager
def _silenced(rank: int, stderr: bool = False):
    """Under torchrun / accelerate launch the main process alone prints: the other ranks' stdout (and
    with `stderr`, their stderr) goes nowhere. Their errors are reported after the block (see `main`)."""
    if not rank:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            contextlib.redirect_stderr(devnull) if stderr else contextlib.nullcontext():
        yield


def _hush_libraries(quiet: bool) -> None:
    """Without --verbose, the libraries' own chatter stays off stderr: Python warnings (deprecations
    inside transformers or PEFT) go through logging, whose handler keeps only fsclip's records, and
    transformers, which prints through a handler of its own, reports errors only; with -q its weight-
    loading and download bars go too. An explicit TRANSFORMERS_VERBOSITY is left as the user set it."""
    logging.captureWarnings(True)
    explicit = "TRANSFORMERS_VERBOSITY" in os.environ
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # for an import still to come
    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        if not explicit:
            hf_logging.set_verbosity_error()
        if quiet:
            hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    rank = world.launch_rank()
    try:
        with _silenced(rank, stderr=True):
            args = parser.parse_args(argv)
    except SystemExit as e:  # usage error (already printed), --help or --version
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    if rank:  # under torchrun / accelerate launch the main process alone prints and shows progress
        args.quiet = True
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
    if not args.verbose:
        _hush_libraries(quiet)
    together = False  # under a launcher: the ranks leave together, after success or an error all of them met
    try:
        if world.launched():
            if not getattr(args, "data_parallel", False):
                raise UsageError(f"fsclip {args.command} runs in one process; under torchrun / accelerate launch "
                                 "run fsclip fit or fsclip eval zeroshot/fewshot/retrieval")
            world.setup(getattr(args, "device", "auto"))
        with _silenced(rank, stderr=True):  # every rank does the same work: summaries and warnings once
            code = int(args.func(args) or 0)
        together = True
        return code
    except FsclipError as e:
        # an error every rank raised (a usage error, an unreadable image) is the main process's to report
        together = isinstance(e, UsageError) or world.raised_on_every_rank(e)
        if not rank or not together:
            print(f"fsclip: error: {f'(rank {rank}) ' if rank else ''}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not rank:
            print("fsclip: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as `yes | head` does
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, the shell's status for a process ended by a closed pipe
    finally:
        logging.captureWarnings(False)
        if together:
            world.leave()
