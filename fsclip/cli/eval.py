"""`fsclip eval`: zero-shot, few-shot and retrieval runs to JSON result files, and reports from them."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fsclip._outputs import check_output
from fsclip.cli._common import add_model_options, nonnegative_int, parse_options, positive_int

DEFAULT_ROOT = os.environ.get("FSCLIP_DATA", "data")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate zero-shot, few-shot and retrieval; build reports",
                       description="Run evaluations on local datasets (one JSON result per run) and build "
                                   "Markdown/CSV tables and plots from the results.")
    tasks = p.add_subparsers(dest="eval_command", required=True, metavar="TASK")

    zs = tasks.add_parser("zeroshot", help="zero-shot classification on a dataset's test split")
    _add_run_options(zs)
    zs.set_defaults(func=run_tasks, task="zeroshot", data_parallel=True)

    fs = tasks.add_parser("fewshot", help="CoOp few-shot protocol: methods x shots x seeds",
                          description="K images per class from train (seeded), min(K, 4) per class for validation, "
                                      "evaluation on the full test split; one result file per (method, K, seed).")
    _add_run_options(fs)
    fs.add_argument("--method", action="append", default=None, metavar="METHOD",
                    help="adapter (repeatable; see `fsclip fit --help`), default: tip-adapter, or prototype "
                         "for a model without a text tower")
    fs.add_argument("--shots", type=positive_int, nargs="+", default=[1, 2, 4, 8, 16], help="K values (default: 1 2 4 8 16)")
    fs.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[1, 2, 3], help="seeds (default: 1 2 3)")
    fs.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="adapter option, e.g. iters=200 or lr=1e-4 (value read as JSON if it parses); repeatable")
    fs.set_defaults(func=run_tasks, task="fewshot", data_parallel=True)

    rt = tasks.add_parser("retrieval", help="image-text retrieval R@1/5/10 on a captioned dataset")
    _add_run_options(rt)
    rt.set_defaults(func=run_tasks, task="retrieval", data_parallel=True)

    rp = tasks.add_parser("report", help="tables (Markdown, CSV) and plots from result files",
                          description="Read result JSON files (or folders of them) and print Markdown tables; "
                                      "with --out also write report.md, results.csv and PNG plots there.")
    rp.add_argument("results", nargs="+", type=Path, help="result files or folders, e.g. results/*.json")
    rp.add_argument("--out", type=Path, default=None, help="folder for report.md, results.csv and plots")
    rp.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="draw PNG plots (with --out)")
    rp.set_defaults(func=run_report)

    ls = tasks.add_parser("datasets", help="list the datasets the harness can read")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    ls.set_defaults(func=run_datasets)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="dataset name (see `fsclip eval datasets`)")
    p.add_argument("--root", type=Path, default=Path(DEFAULT_ROOT),
                   help="data root holding the dataset's folder (CoOp layout), or the dataset folder itself "
                        f"(default: $FSCLIP_DATA or {DEFAULT_ROOT!r})")
    p.add_argument("--templates", default=None,
                   help="prompt template set or JSON file (default: the dataset's own, e.g. CoOp's prompt)")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for result JSON files (default: results)")
    p.add_argument("--skip-existing", action=argparse.BooleanOptionalAction, default=False,
                   help="keep runs that already have a result file in --out instead of running them again")
    p.add_argument("--format", choices=["table", "json"], default="table", help="table or JSON Lines on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or warnings")
    add_model_options(p)


def _headline(record: dict) -> str:
    m = record["metrics"]
    if "top1" in m:
        groups = "".join(f", {g} {100 * v:.1f}%" for g, v in m.get("group_recall", {}).items() if v is not None)
        return f"top-1 {100 * m['top1']:.1f}%, mean per-class recall {100 * m['mean_per_class_recall']:.1f}%{groups}"
    return ", ".join(f"{k.replace('image_to_text_', 'I→T ').replace('text_to_image_', 'T→I ')} {100 * v:.1f}%"
                     for k, v in m.items() if "_R@" in k)


def run_tasks(args) -> int:
    from fsclip.backends import load_model
    from fsclip.evaluation import plan_runs, run_all
    from fsclip.evaluation.datasets import get_dataset
    from fsclip.evaluation.protocol import DATASET_TASK

    get_dataset(args.dataset, DATASET_TASK[args.task])  # a wrong name fails before any model loads
    if args.templates is not None:
        from fsclip.prompts_io import load_templates

        load_templates(args.templates)
    # result files are named by run id and written atomically into --out: any folder will do, a file not
    check_output(args.out, "--out", lambda _: True, replaces=False)
    loaded = {}

    def backend(spec):
        if spec not in loaded:
            loaded[spec] = load_model(spec, device=args.device, dtype=args.dtype, runtime=args.runtime)
        return loaded[spec]

    methods = getattr(args, "method", None)
    if not methods:  # the training-free baseline the model can run: Tip-Adapter needs a text tower
        methods = ["tip-adapter" if args.task != "fewshot" or backend(args.model).has_text else "prototype"]
    if args.task == "fewshot":
        from fsclip.adapters import get_adapter
        from fsclip.adapters.registry import AUTO

        for m in methods:
            if m != AUTO:
                get_adapter(m)
    specs = plan_runs(args.task, args.model, args.dataset, methods, getattr(args, "shots", ()),
                      getattr(args, "seeds", ()), args.templates, parse_options(getattr(args, "option", [])))
    outcomes = run_all(
        specs, args.root, args.out, skip_existing=args.skip_existing, batch_size=args.batch_size,
        load_backend=backend,
        progress=not args.quiet,
    )
    for o in outcomes:
        if args.format == "json":
            print(json.dumps({"run_id": o.spec.run_id, "path": str(o.path), "skipped": o.skipped,
                              "metrics": {k: v for k, v in o.record["metrics"].items()
                                          if isinstance(v, int | float)}}))
        else:
            status = "skipped (exists)" if o.skipped else "done"
            print(f"{o.spec.run_id}: {status}: {_headline(o.record)}")
    if args.format == "table":
        print(f"{len(outcomes)} run(s), {sum(o.skipped for o in outcomes)} skipped; results in {args.out}/",
              file=sys.stderr)
    return 0


def run_report(args) -> int:
    from fsclip.evaluation import build_report, load_results
    from fsclip.evaluation.report import is_report_folder

    if args.out is not None:
        check_output(args.out, "--out", is_report_folder, replaces=False,
                     inputs=[("results folder" if p.is_dir() else "results file", p) for p in args.results])
    report = build_report(load_results(args.results), args.out, plots=args.plots)
    print(report.markdown)
    if args.out is not None:
        print(f"wrote {len(report.files)} file(s) to {args.out}/", file=sys.stderr)
    return 0


def run_datasets(args) -> int:
    from fsclip.evaluation import get_dataset, list_datasets

    for name in list_datasets():
        spec = get_dataset(name)
        if args.format == "json":
            print(json.dumps({"name": name, "task": spec.task, "folder": spec.folder, "templates": spec.templates,
                              "description": spec.description}))
        else:
            print(f"{name:<22} {spec.task:<15} {spec.description}")
    return 0
