"""`fsclip fit`: adapt a model to a folder of labelled images and save the adapter."""

from __future__ import annotations

import argparse
from pathlib import Path

from fsclip.cli._common import add_model_options


def add_parser(sub) -> None:
    from fsclip.adapters import list_methods

    p = sub.add_parser(
        "fit", help="few-shot adapt a model to labelled images (one sub-folder per class)",
        description="Fit a few-shot adapter on an ImageFolder (train/<class>/<image>; '_' in folder names reads "
                    "as a space), compare it with zero-shot on a validation split, and save it to --out.",
    )
    p.add_argument("train", type=Path, help="training folder: one sub-folder of images per class")
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write (written atomically)")
    p.add_argument("--method", default="auto",
                   help=f"{', '.join(list_methods())}; auto measures the data and picks one (default: auto)")
    p.add_argument("--val", type=Path, default=None,
                   help="validation folder with the same classes (default: min(k, 4) images per class held out "
                        "of the training folder)")
    p.add_argument("--shots", type=int, default=None, help="use K randomly chosen training images per class")
    p.add_argument("--seed", type=int, default=0, help="seed for --shots, the split and training (default: 0)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (methods that train)")
    p.add_argument("--iters", type=int, default=None, help="training steps (LoRA, fine-tuning)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (methods that train)")
    p.add_argument("--templates", default="imagenet80",
                   help="prompt template set or JSON file for the class names (default: imagenet80)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips in augmentation (--no-flip where mirroring changes meaning)")
    p.add_argument("--merge", type=Path, default=None, metavar="DIR",
                   help="LoRA only: also write the base model with the update merged in, loadable as --model DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and --merge) folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or warnings")
    add_model_options(p)
    p.set_defaults(func=run, batch_size=None)


def _options(args) -> dict:
    given = {"epochs": args.epochs, "iters": args.iters, "lr": args.lr, "batch_size": args.batch_size,
             "flip": args.flip}
    return {"templates": args.templates, "seed": args.seed, **{k: v for k, v in given.items() if v is not None}}


def run(args) -> int:
    from fsclip.adapters import AUTO, fit, get_adapter, holdout_split
    from fsclip.backends import load_model
    from fsclip.data import load_image_folder, sample_shots
    from fsclip.errors import UsageError

    if args.method != AUTO:
        get_adapter(args.method)  # unknown names fail here, before any loading

    for folder in (args.out, args.merge):
        if folder is not None and folder.exists() and not args.overwrite:
            raise UsageError(f"{str(folder)!r} already exists; choose another folder or pass --overwrite")
    if args.merge is not None and args.method not in ("lora", "auto"):
        raise UsageError(f"--merge applies to method lora only, not {args.method!r}")
    data = load_image_folder(args.train)
    if args.val is not None:
        val = load_image_folder(args.val, classes=list(data.classes))
        train = sample_shots(data, args.shots, args.seed) if args.shots else data
    else:
        train, val = holdout_split(data, args.shots, args.seed)
    backend = load_model(args.model, device=args.device, dtype=args.dtype)
    if not backend.has_text:  # TODO(issue 11 part 2): the few-shot methods on image-only backbones
        raise UsageError(f"model {args.model!r} has no text tower, and the few-shot methods do not take "
                         "image-only models yet (issue 11); use a CLIP-style model")
    print(f"fitting {args.method} on {len(train)} training and {len(val)} validation images of "
          f"{len(train.classes)} classes with {args.model}")
    adapter = fit(backend, train, args.method, val=val, progress=not args.quiet, **_options(args))
    m = adapter.metrics
    if m.get("advice"):
        print("strategy advisor:")
        for line in _advice_lines(m["advice"]):
            print(f"  {line}")
    acc, ece = m["val_accuracy"], m["val_ece"]
    print(f"validation accuracy ({m['val_images']} images): zero-shot {acc['zero_shot']:.3f} -> "
          f"{adapter.name} {acc['adapter']:.3f} ({acc['adapter'] - acc['zero_shot']:+.3f})")
    print(f"calibration: temperature {m['temperature']:.3f}, ECE {ece['uncalibrated']:.3f} -> {ece['calibrated']:.3f}")
    adapter.save(args.out, overwrite=args.overwrite)
    print(f"saved {args.out}/  (use it: fsclip predict IMAGES --adapter {args.out})")
    if args.merge is not None:
        if not hasattr(adapter, "merge"):
            print(f"not writing --merge: the advisor chose {adapter.name}, which has nothing to merge")
        else:
            adapter.merge(args.merge, overwrite=args.overwrite)
            print(f"saved merged model {args.merge}/  (use it: --model {args.merge})")
    return 0


def _advice_lines(advice: dict) -> list[str]:
    from fsclip.adapters import Advice

    return Advice(**advice).lines()
