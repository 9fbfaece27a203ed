"""`fsclip fit`: adapt a model to a folder of labelled images and save the adapter."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from fsclip.cli._common import add_model_options, nonnegative_int, parse_options, positive_float, positive_int


def add_parser(sub) -> None:
    from fsclip.adapters import list_methods

    p = sub.add_parser(
        "fit", help="few-shot adapt a model to labelled images (one sub-folder per class)",
        description="Fit a few-shot adapter on an ImageFolder (train/<class>/<image>; '_' in folder names reads "
                    "as a space) within a compute budget (--budget; the plan is printed before the work), compare "
                    "it with zero-shot on a validation split used for nothing else, and save it to --out. Under "
                    "torchrun or accelerate launch the fit is data-parallel over the ranks (docs/SCALING.md).",
    )
    p.add_argument("train", type=Path, help="training folder: one sub-folder of images per class")
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write (written atomically)")
    p.add_argument("--method", default="auto",
                   help=f"{', '.join(list_methods())}; auto measures the data and picks one (default: auto)")
    p.add_argument("--val", type=Path, default=None,
                   help="validation folder with the same classes (default: min(k, 4) images per class held out "
                        "of the training folder)")
    p.add_argument("--shots", type=positive_int, default=None, help="use K randomly chosen training images per class")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed for --shots, the split and training (default: 0)")
    p.add_argument("--epochs", type=positive_int, default=None, help="training epochs (methods that train)")
    p.add_argument("--iters", type=positive_int, default=None, help="training steps (LoRA, fine-tuning)")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (methods that train)")
    p.add_argument("--templates", default="imagenet80",
                   help="prompt template set or JSON file for the class names (default: imagenet80)")
    p.add_argument("--budget", default=None, metavar="DURATION",
                   help="wall-clock budget for the whole fit, e.g. 90s, 5m, 2h or 'none': schedules are cut to fit "
                        "it, --iters/--epochs win over it (default: 3m on CPU, 30m on a GPU)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips in augmentation (--no-flip where mirroring changes meaning)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any option of the method's config, e.g. rank=8, dropout=0 or views=20 (value read as JSON "
                        "if it parses); repeatable")
    p.add_argument("--compare-scratch", action="store_true",
                   help="afterwards train the same architecture from random initialisation on the same images, "
                        "augmentation, seed and budget, and compare validation accuracy and convergence (the fit "
                        "then takes up to twice the budget)")
    p.add_argument("--merge", type=Path, default=None, metavar="DIR",
                   help="LoRA only: also write the base model with the update merged in, loadable as --model DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and --merge) folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or warnings")
    add_model_options(p)
    p.set_defaults(func=run, batch_size=None, data_parallel=True)


def _options(args, method: str) -> dict:
    """Adapter options from the flags; training flags a method does not have are dropped with a warning."""
    from fsclip.adapters import AUTO, get_adapter

    given = {"epochs": args.epochs, "iters": args.iters, "lr": args.lr, "batch_size": args.batch_size,
             "flip": args.flip}
    given = {k: v for k, v in given.items() if v is not None}
    if method != AUTO:  # for auto, `fit` drops them once the advisor has chosen
        fields = get_adapter(method).config_class.fields()
        dropped = sorted(k for k in given if k not in fields)
        if dropped:
            flags = ", ".join("--" + k.replace("_", "-") for k in dropped)
            logging.getLogger("fsclip.cli.fit").warning("%s: not an option of method %s; ignored", flags, method)
        given = {k: v for k, v in given.items() if k in fields}
    # --option names a config field outright: an unknown one is an error (for auto: dropped once it has chosen)
    return {"templates": args.templates, "seed": args.seed, **given, **parse_options(args.option)}


@contextlib.contextmanager
def _plan_lines(quiet: bool):
    """Show the fit's plan and progress lines (the library logs them) on stderr, unless --quiet."""
    from fsclip.adapters._budget import PLAN_LOGGER

    log = logging.getLogger(PLAN_LOGGER)
    saved = (log.level, log.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    if not quiet:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def _check_paths(args) -> None:
    """Every output checked against the inputs and each other before anything loads or trains."""
    from fsclip._outputs import check_output, check_separate
    from fsclip.adapters._export import is_merged_model_folder
    from fsclip.adapters.base import is_adapter_folder

    inputs = [("training folder", args.train), ("validation folder", args.val)]
    check_separate([("--out", args.out), ("--merge", args.merge)])
    check_output(args.out, "--out", is_adapter_folder, overwrite=args.overwrite, inputs=inputs)
    if args.merge is not None:
        check_output(args.merge, "--merge", is_merged_model_folder, overwrite=args.overwrite, inputs=inputs)


def _check_disjoint(train, val) -> None:
    """Refuse validation images that are training images (same file, or same bytes under another name):
    accuracy on them says nothing, and calibration on them is overconfident."""
    import hashlib
    import os

    from fsclip._paths import display_path
    from fsclip.errors import UsageError

    def digest(path) -> str:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    seen = {os.path.realpath(p): p for p in train.paths}
    shared = [(v, seen[os.path.realpath(v)]) for v in val.paths if os.path.realpath(v) in seen]
    if not shared:  # same bytes under another name: hash only the files whose sizes collide
        by_size: dict[int, list] = {}
        for p in train.paths:
            by_size.setdefault(os.path.getsize(p), []).append(p)
        hashes = {}
        for v in val.paths:
            candidates = by_size.get(os.path.getsize(v), [])
            if not candidates:
                continue
            mine = digest(v)
            for t in candidates:
                if t not in hashes:
                    hashes[t] = digest(t)
                if hashes[t] == mine:
                    shared.append((v, t))
                    break
    if shared:
        v, t = shared[0]
        raise UsageError(f"{len(shared)} validation image(s) are also training images (e.g. {display_path(v)!r} = "
                         f"{display_path(t)!r}); --val must hold other images than the training folder")


def run(args) -> int:
    from fsclip.adapters import AUTO, fit, get_adapter, holdout_split, parse_duration
    from fsclip.backends import load_model
    from fsclip.data import load_image_folder, sample_shots
    from fsclip.distributed import world
    from fsclip.errors import UsageError
    from fsclip.prompts_io import load_templates

    if args.method != AUTO:
        method = get_adapter(args.method)  # unknown names fail here, before any loading
        if args.runtime != "torch" and (method.trains_text or not method.frozen_backbone):
            raise UsageError(f"--method {args.method} trains the towers, which needs --runtime torch "
                             f"(runtime {args.runtime} is for inference)")
    if args.compare_scratch and args.runtime != "torch":
        raise UsageError(f"--compare-scratch trains a model from scratch, which needs --runtime torch (runtime "
                         f"{args.runtime} is for inference)")
    if args.budget is not None:
        parse_duration(args.budget)  # a bad duration fails before any loading too
    if args.merge is not None and args.method not in ("lora", "auto"):
        raise UsageError(f"--merge applies to method lora only, not {args.method!r}")
    load_templates(args.templates)  # a bad set or file fails now, not after training
    _check_paths(args)
    options = _options(args, args.method)
    reserved = sorted(set(options) & {"advisor", "budget", "config", "method", "progress", "val"})
    if reserved:  # fit()'s own parameters, not a method's options
        key = reserved[0]
        hint = f"; use --{key}" if key in ("budget", "method", "val") else ""
        raise UsageError(f"--option {key}: not an option of a method{hint}")
    data = load_image_folder(args.train)
    if args.val is not None:
        val = load_image_folder(args.val, classes=list(data.classes))
        _check_disjoint(data, val)
        train = sample_shots(data, args.shots, args.seed) if args.shots else data
    else:
        train, val = holdout_split(data, args.shots, args.seed)
    backend = load_model(args.model, device=args.device, dtype=args.dtype, runtime=args.runtime,
                         calibration=train.paths)
    if args.merge is not None and not backend.has_text:
        raise UsageError(f"--merge writes a CLIP model whose class prompts classify; model {args.model!r} has no "
                         "text tower, and its adapter classifies with its own head: use the adapter folder")
    try:
        with _plan_lines(args.quiet):
            adapter = fit(backend, train, args.method, val=val, budget=args.budget, progress=not args.quiet,
                          compare_scratch=args.compare_scratch, **options)
    except KeyboardInterrupt:
        print(f"fsclip: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    m = adapter.metrics
    if m.get("advice"):
        print(f"method: {adapter.name}, chosen by the strategy advisor on the training images: "
              f"{m['advice']['reason']}")
        if m["advice"].get("compute"):
            print(f"compute: {m['advice']['compute']}")
    for line in _selection_lines(m.get("selection", {})):
        print(line)
    acc, ece = m["val_accuracy"], m["val_ece"]
    uses = m["data_roles"]["validation images"]
    held = "used for nothing else" if m["val_accuracy_is_held_out"] else f"also used for {uses}: optimistic"
    if "zero_shot" in acc:
        print(f"validation accuracy ({m['val_images']} images, {held}): zero-shot {acc['zero_shot']:.3f} -> "
              f"{adapter.name} {acc['adapter']:.3f} ({acc['adapter'] - acc['zero_shot']:+.3f})")
    else:
        print(f"validation accuracy ({m['val_images']} images, {held}): {adapter.name} {acc['adapter']:.3f}")
    crossfit = ece.get("calibrated_cross_fitted")
    crossfit = f" (cross-fitted: {crossfit:.3f})" if crossfit is not None else ""
    print(f"calibration on the validation images: temperature {m['temperature']:.3f}, ECE {ece['uncalibrated']:.3f} "
          f"-> {ece['calibrated']:.3f}{crossfit}")
    print(f"fit time: {m['budget']['fit_seconds']:.1f} s (budget: "
          f"{'none' if m['budget']['seconds'] is None else str(round(m['budget']['seconds'])) + ' s'})")
    if m.get("scratch_comparison"):
        from fsclip.adapters._compare import lines

        for line in lines(m["scratch_comparison"]):
            print(line)
    if not world.is_main():  # data-parallel: every rank holds the same adapter; the main process writes it
        return 0
    adapter.save(args.out, overwrite=args.overwrite)
    print(f"saved {args.out}/  (use it: fsclip predict IMAGES --adapter {args.out})")
    if args.merge is not None:
        if not hasattr(adapter, "merge"):
            print(f"not writing --merge: the advisor chose {adapter.name}, which has nothing to merge")
        else:
            adapter.merge(args.merge, overwrite=args.overwrite)
            print(f"saved merged model {args.merge}/  (use it: --model {args.merge})")
    return 0


def _selection_lines(selection: dict) -> list[str]:
    """What the method chose and from which data, in one line, e.g. 'chosen: C=10 (5-fold cross-validation ...)'."""
    how = selection.get("chosen by")
    chosen = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in selection.items()
              if k in ("C", "alpha", "beta", "penalty")]
    lines = []
    if how:
        lines.append(f"chosen: {', '.join(chosen)} ({how})" if chosen else f"chosen: {how}")
    for key in ("views", "training"):
        plan = selection.get(key)
        if isinstance(plan, dict) and plan.get("planned") is not None:
            lines.append(f"{plan['what']}: {plan['planned']} {plan['unit']}s ({plan['reason']})")
    return lines
