"""Tables and plots from result files: Markdown for reading, CSV (one row per run) for analysis, PNGs."""

from __future__ import annotations

import csv
import io
import logging
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsclip._io import atomic_write
from fsclip._outputs import check_output
from fsclip.errors import UsageError
from fsclip.evaluation.plots import (
    curves,
    method_label,
    metric_label,
    plot_accuracy_vs_shots,
    plot_confusion,
    plot_reliability,
    plot_retrieval,
)
from fsclip.evaluation.results import ZERO_SHOT

__all__ = ["Report", "build_report", "csv_rows", "is_report_folder", "markdown_tables"]

logger = logging.getLogger(__name__)

Record = Mapping[str, Any]
TITLE = "# fsclip evaluation report"


def is_report_folder(path: str | Path) -> bool:
    """True for a folder holding a `report.md` that `build_report` wrote (what a new report may replace)."""
    try:
        with open(Path(path) / "report.md", encoding="utf-8") as f:
            return f.readline().rstrip("\n") == TITLE
    except (OSError, UnicodeDecodeError):
        return False


@dataclass(frozen=True)
class Report:
    markdown: str
    files: tuple[Path, ...]  # everything written: report.md, results.csv, PNGs


def _pct(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * statistics.pstdev(values):.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _dedupe(records: Sequence[Record]) -> list[Record]:
    by_id = {r["run"]["run_id"]: r for r in records}  # the last file given for a run wins
    return sorted(by_id.values(), key=lambda r: (r["run"]["dataset"], r["model"]["spec"], r["run"]["task"],
                                                 r["run"]["method"], r["run"]["shots"], r["run"]["seed"]))


def _by(records: Sequence[Record], *keys: str) -> dict[tuple, list[Record]]:
    out: dict[tuple, list[Record]] = {}
    for r in records:
        out.setdefault(tuple(r["run"][k] for k in keys), []).append(r)
    return out


def _groups(records: Sequence[Record]) -> list[str]:
    return sorted({g for r in records for g in r["metrics"].get("group_recall", {})})


def _mixed_weights(records: Sequence[Record]) -> list[str]:
    """Warnings for model specs whose results come from different weights (e.g. a retrained checkpoint)."""
    prints: dict[str, set[str]] = {}
    for r in records:
        prints.setdefault(r["model"]["spec"], set()).add(r["model"]["fingerprint"])
    return [f"**Warning:** results for model `{spec}` come from {len(fp)} different weights (fingerprints "
            f"{', '.join(sorted(fp))}); rerun them with one." for spec, fp in sorted(prints.items()) if len(fp) > 1]


def markdown_tables(records: Sequence[Record]) -> str:
    records = _dedupe(records)
    parts = _mixed_weights(records)
    zs = [r for r in records if r["run"]["task"] == "zeroshot"]
    if zs:
        groups = _groups(zs)
        rows = [[r["run"]["dataset"], r["model"]["spec"], r["run"]["templates"] or "(dataset's)",
                 _pct([r["metrics"]["top1"]]), _pct([r["metrics"]["mean_per_class_recall"]]),
                 *[_pct([v] if (v := r["metrics"]["group_recall"].get(g)) is not None else []) for g in groups],
                 _pct([r["metrics"]["ece"]]), r["metrics"]["n"]] for r in zs]
        header = ["dataset", "model", "templates", "top-1 %", "mean per-class recall %",
                  *[f"recall on {g} %" for g in groups], "ECE %", "test images"]
        parts.append("### Zero-shot\n\n" + _table(header, rows))
    fs = [r for r in records if r["run"]["task"] == "fewshot"]
    for (dataset, model), runs in _by(fs, "dataset", "model").items():
        runs_zs = [r for r in zs if (r["run"]["dataset"], r["run"]["model"]) == (dataset, model)]
        shots = sorted({r["run"]["shots"] for r in runs})
        seeds = sorted({r["run"]["seed"] for r in runs})
        for metric in ("top1", "mean_per_class_recall", *[f"group:{g}" for g in _groups(runs)]):
            data = curves(runs + runs_zs, metric)
            zero = sorted(label for label in data if label.startswith(ZERO_SHOT))
            # a model without zero-shot runs (image-only) has no K=0 column: omitted, not zero
            first = ["K=0"] if zero else []
            rows = [[label, _pct(data.pop(label)[0]), *["" for _ in shots]] for label in zero]
            rows += [[m, *[""] * len(first), *[_pct(data[m].get(k, [])) for k in shots]] for m in sorted(data)]
            title = (f"### Few-shot, {dataset}, {model}: {metric_label(metric)} (%), "
                     f"mean ± std over seeds {', '.join(map(str, seeds))}")
            parts.append(title + "\n\n" + _table(["method", *first, *[f"K={k}" for k in shots]], rows))
        times: dict[str, list[float]] = {}
        for r in runs:
            times.setdefault(method_label(r), []).append(r["timing"]["fit_seconds"])
        parts.append("Mean fit time per run (s): " + ", ".join(f"{m} {statistics.fmean(t):.1f}"
                                                               for m, t in sorted(times.items())))
    parts += _side_by_side(fs, zs)
    rt = [r for r in records if r["run"]["task"] == "retrieval"]
    if rt:
        ks = [k.split("@")[1] for k in rt[0]["metrics"] if k.startswith("image_to_text_R@")]
        rows = [[r["run"]["dataset"], r["model"]["spec"], r["dataset"]["n_images"], r["dataset"]["n_captions"],
                 *[_pct([r["metrics"][f"image_to_text_R@{k}"]]) for k in ks],
                 *[_pct([r["metrics"][f"text_to_image_R@{k}"]]) for k in ks]] for r in rt]
        header = ["dataset", "model", "images", "captions", *[f"I→T R@{k}" for k in ks], *[f"T→I R@{k}" for k in ks]]
        parts.append("### Retrieval (recall %, image→text and text→image)\n\n" + _table(header, rows))
    return "\n\n".join(parts) + "\n"


def _side_by_side(fs: Sequence[Record], zs: Sequence[Record]) -> list[str]:
    """Per dataset with few-shot results from several models: method x K rows, one top-1 column per model.

    Zero-shot is a row only where some model has it; a model without it (no text tower) shows "–".
    """
    parts = []
    for (dataset,), runs in _by(fs, "dataset").items():
        models = sorted({r["run"]["model"] for r in runs})
        if len(models) < 2:
            continue
        per_model = {m: curves([r for r in [*runs, *zs] if r["run"]["dataset"] == dataset and r["run"]["model"] == m],
                               "top1") for m in models}
        zero = sorted({label for data in per_model.values() for label in data if label.startswith(ZERO_SHOT)})
        rows = [[label, "0", *[_pct(per_model[m].get(label, {}).get(0, [])) for m in models]] for label in zero]
        methods = sorted({label for data in per_model.values() for label in data} - set(zero))
        shots = sorted({r["run"]["shots"] for r in runs})
        rows += [[method, k, *[_pct(per_model[m].get(method, {}).get(k, [])) for m in models]]
                 for method in methods for k in shots
                 if any(per_model[m].get(method, {}).get(k) for m in models)]
        parts.append(f"### Few-shot, {dataset}: backbones side by side, top-1 accuracy (%), mean ± std over seeds"
                     "\n\n" + _table(["method", "K", *models], rows))
    return parts


def csv_rows(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One flat row per run: its identity, headline metrics, group recalls and timings."""
    rows = []
    for r in _dedupe(records):
        run, m = r["run"], r["metrics"]
        row = {"run_id": run["run_id"], "task": run["task"], "dataset": run["dataset"], "model": r["model"]["spec"],
               "method": run["method"], "shots": run["shots"], "seed": run["seed"], "templates": run["templates"] or ""}
        for key in ("top1", "mean_per_class_recall", "ece", "nll", "n"):
            if key in m:
                row[key] = m[key]
        row.update({f"recall[{g}]": v for g, v in m.get("group_recall", {}).items()})
        row.update({k: v for k, v in m.items() if "_R@" in k})
        row.update({k: v for k, v in r.get("timing", {}).items() if k.endswith("seconds")})
        rows.append(row)
    return rows


def _slug(*parts: str) -> str:
    return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", p).strip("-") for p in parts)


def _save(fig, path: Path) -> Path:
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    return path


def _plots(records: Sequence[Record], out: Path) -> list[tuple[str, Path]]:
    """(caption, file) of every plot: accuracy vs shots, reliability and confusion per dataset and model,
    retrieval bars."""
    written = []
    cls = [r for r in records if r["run"]["task"] in ("zeroshot", "fewshot")]
    for (dataset, model), runs in _by(cls, "dataset", "model").items():
        name = _slug(dataset, Path(model).name or model)
        fs = [r for r in runs if r["run"]["task"] == "fewshot"]
        zs = [r for r in runs if r["run"]["task"] == "zeroshot"]
        if fs:
            metrics = ["top1", *[f"group:{g}" for g in _groups(fs)]]
            fig = plot_accuracy_vs_shots(runs, metrics, title=f"{dataset} — {model}")
            written.append((f"{dataset}, {model}: accuracy vs shots", _save(fig, out / f"shots__{name}.png")))
        # calibration and confusion: zero-shot, and each method at its largest K
        by_label: dict[str, list[Record]] = {}
        for r in zs + fs:
            by_label.setdefault(method_label(r), []).append(r)
        panels = {}
        for label, rs in by_label.items():
            kmax = max(r["run"]["shots"] for r in rs)
            panels[f"{label}, K={kmax}" if kmax else label] = [r for r in rs if r["run"]["shots"] == kmax]
        if panels:
            written.append((f"{dataset}, {model}: reliability (calibration bins pooled over seeds)",
                            _save(plot_reliability(panels), out / f"reliability__{name}.png")))
        for label, rs in panels.items():
            first = min(rs, key=lambda r: r["run"]["seed"])
            if first["metrics"].get("confusion") is not None:
                path = out / f"confusion__{name}__{_slug(label)}.png"
                written.append((f"{dataset}, {model}: confusion, {label}", _save(plot_confusion(first), path)))
    rt = [r for r in records if r["run"]["task"] == "retrieval"]
    if rt:
        written.append(("retrieval recall@K", _save(plot_retrieval(rt), out / "retrieval.png")))
    return written


def build_report(records: Sequence[Record], out_dir: str | Path | None = None, plots: bool = True) -> Report:
    """Markdown tables of `records`; with `out_dir`, also `report.md` (tables + plot links), `results.csv`
    and the PNG plots there."""
    records = _dedupe(records)
    tables = markdown_tables(records)
    if out_dir is None:
        return Report(tables, ())
    out = Path(out_dir)
    check_output(out, "report folder", is_report_folder, replaces=False)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("plots need matplotlib: pip install 'fsclip[eval]', or pass --no-plots") from None
    figures = _plots(records, out) if plots else []
    md = f"{TITLE}\n\n" + tables
    if figures:
        md += "\n## Plots\n\n" + "\n\n".join(f"**{cap}**\n\n![{cap}]({p.name})" for cap, p in figures) + "\n"
        files += [p for _, p in figures]
    with atomic_write(out / "report.md", "w") as f:
        f.write(md)
    rows = csv_rows(records)
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(out / "results.csv", "w") as f:
        f.write(buf.getvalue())
    files = [out / "report.md", out / "results.csv", *files]
    logger.info("report: %d run(s), %d file(s) in %s", len(records), len(files), out)
    return Report(md, tuple(files))
