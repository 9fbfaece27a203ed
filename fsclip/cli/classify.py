"""`fsclip classify`: zero-shot labels for images from class names, or a model's own classes (--own-head)."""

from __future__ import annotations

from fsclip.cli._common import (
    add_model_options,
    add_prediction_options,
    in_input_order,
    read_inputs,
    write_records,
)


def add_parser(sub) -> None:
    p = sub.add_parser("classify", help="zero-shot classify images from text labels",
                       description="Classify images into the given labels with a prompt-ensemble text classifier.")
    p.add_argument("paths", nargs="+", help="image files and/or folders (walked recursively)")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='comma-separated class names, e.g. "cat,dog,bird"')
    labels.add_argument("--labels-file", help="file with one class name per line (UTF-8, or UTF-16 with a BOM)")
    labels.add_argument("--own-head", action="store_true",
                        help="classify into the model's own classes (e.g. ImageNet-1k for timm:resnet50.a1_in1k)")
    templates = p.add_mutually_exclusive_group()
    templates.add_argument("--templates", default=None,
                           help="template set name or a JSON file (default: imagenet80)")
    templates.add_argument("--template", action="append", default=None,
                           help='inline template with {} for the label, e.g. "a photo of a {}."; repeatable')
    add_model_options(p)
    add_prediction_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from fsclip.backends import load_model
    from fsclip.backends.base import no_text_tower
    from fsclip.errors import UsageError
    from fsclip.predict import predict_records
    from fsclip.prompts_io import load_templates
    from fsclip.zeroshot import ZeroShotClassifier, parse_labels

    labels = None if args.own_head else parse_labels(args.labels, args.labels_file)
    templates = None if args.own_head else load_templates(args.template or args.templates or "imagenet80")
    entries = read_inputs(args.paths)
    paths = [p for p, reason in entries if reason is None]
    backend = load_model(args.model, device=args.device, dtype=args.dtype, runtime=args.runtime, calibration=paths)
    if args.own_head:
        if not backend.has_own_head:
            raise UsageError(f"model {args.model!r} has no classification head of its own; give --labels"
                             + ("" if backend.has_text else " with an image-text model, or train one with `fsclip fit`"))
        labels = backend.own_head_labels()
        proba, encode = (lambda logits: logits.softmax(dim=-1)), backend.encode_own_head
    elif not backend.has_text:
        instead = "train a classifier on labelled images with `fsclip fit`"
        raise UsageError(no_text_tower(args.model, instead + (" or use its own classes with --own-head"
                                                              if backend.has_own_head else "")))
    else:
        proba, encode = ZeroShotClassifier(backend, labels, templates, progress=not args.quiet).predict_proba, None
    records = predict_records(
        backend, paths, proba, labels, args.top_k, args.threshold, args.batch_size,
        progress=not args.quiet, encode=encode,
    )
    ok = sum("error" not in rec for rec in write_records(in_input_order(entries, records), args.format))
    return 0 if ok else 1
