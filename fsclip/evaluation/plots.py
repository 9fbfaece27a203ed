"""Plots of evaluation results, drawn with matplotlib's object API on the Agg canvas (no display needed).

Each function returns a `matplotlib.figure.Figure`; `fig.savefig(path)` writes it, and a notebook
shows it when it is the value of a cell.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from fsclip.evaluation.metrics import ece_from_bins
from fsclip.evaluation.results import ZERO_SHOT

__all__ = [
    "metric_value",
    "plot_accuracy_vs_shots",
    "plot_confusion",
    "plot_image_grid",
    "plot_reliability",
    "plot_retrieval",
]

Record = Mapping[str, Any]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def metric_value(record: Record, metric: str) -> float | None:
    """`top1`, `mean_per_class_recall`, `ece`, ... or `group:<name>` (mean recall over a class group)."""
    metrics = record["metrics"]
    if metric.startswith("group:"):
        return metrics.get("group_recall", {}).get(metric[len("group:"):])
    value = metrics.get(metric)
    return float(value) if isinstance(value, int | float) else None


def metric_label(metric: str) -> str:
    if metric.startswith("group:"):
        return f"recall on {metric[len('group:'):]}"
    return {"top1": "top-1 accuracy", "mean_per_class_recall": "mean per-class recall"}.get(metric, metric)


def method_label(record: Record) -> str:
    """The method, with the options and templates a run set (runs differing in them are other curves)."""
    run = record["run"]
    extra = [f"{k}={v}" for k, v in sorted(run.get("options", {}).items())]
    if run.get("templates"):
        extra.append(f"templates={run['templates']}")
    return f"{run['method']} ({', '.join(extra)})" if extra else run["method"]


def curves(records: Sequence[Record], metric: str) -> dict[str, dict[int, list[float]]]:
    """method label -> shots -> values over seeds; zero-shot runs appear as `zero-shot` at 0 shots."""
    out: dict[str, dict[int, list[float]]] = {}
    for r in records:
        value = metric_value(r, metric)
        if value is not None and r["run"]["task"] in ("fewshot", "zeroshot"):
            out.setdefault(method_label(r), {}).setdefault(r["run"]["shots"], []).append(value)
    return out


def plot_accuracy_vs_shots(records: Sequence[Record], metrics: Sequence[str] = ("top1",), title: str = ""):
    """One panel per metric: mean over seeds per method vs K (log scale), error bars one standard
    deviation over seeds; zero-shot as a dashed line. `records`: one dataset and model."""
    fig = _figure(4.6 * len(metrics), 3.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        data = curves(records, metric)
        zero = {label: data.pop(label)[0] for label in sorted(data) if label.startswith(ZERO_SHOT)}
        for method in sorted(data):
            ks = sorted(data[method])
            means = [100 * statistics.fmean(data[method][k]) for k in ks]
            stds = [100 * statistics.pstdev(data[method][k]) for k in ks]
            ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=method)
        for n, (label, values) in enumerate(zero.items()):
            ax.axhline(100 * statistics.fmean(values), color="grey", linestyle=("--", ":", "-.")[n % 3], label=label)
        all_ks = sorted({k for m in data.values() for k in m})
        if all_ks:
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_ks, [str(k) for k in all_ks])
        ax.set_xlabel("shots per class (K)")
        ax.set_ylabel(f"{metric_label(metric)} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_confusion(record: Record, max_labels: int = 60):
    """Row-normalised confusion matrix (rows: true class) of one classification run."""
    import numpy as np

    confusion = record["metrics"].get("confusion")
    classes = record["dataset"]["classes"]
    if confusion is None:
        raise ValueError(f"run {record['run']['run_id']} stored no confusion matrix ({len(classes)} classes)")
    m = np.asarray(confusion, dtype=float)
    m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    side = min(12.0, 3.0 + 0.16 * len(classes))
    fig = _figure(side + 1.0, side)
    ax = fig.subplots()
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= max_labels:
        ticks = range(len(classes))
        ax.set_xticks(ticks, classes, rotation=90, fontsize=7)
        ax.set_yticks(ticks, classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    run = record["run"]
    shots = f", K={run['shots']}, seed {run['seed']}" if run["task"] == "fewshot" else ""
    ax.set_title(f"{run['dataset']}: {run['method']}{shots} (top-1 {100 * record['metrics']['top1']:.1f}%)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def _pool(records: Sequence[Record]) -> dict[str, list[float]]:
    bins = [r["metrics"]["calibration"] for r in records]
    return {k: [sum(vals) for vals in zip(*(b[k] for b in bins))] for k in ("count", "confidence_sum", "correct_sum")}


def plot_reliability(groups: Mapping[str, Sequence[Record]]):
    """Reliability diagrams, one panel per label (e.g. a method), calibration bins pooled over its runs:
    accuracy vs confidence per bin; a perfectly calibrated model lies on the diagonal."""
    fig = _figure(3.2 * len(groups), 3.4)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (label, records) in zip(axes, groups.items()):
        pooled = _pool(records)
        n_bins = len(pooled["count"])
        width = 1.0 / n_bins
        centres = [(i + 0.5) * width for i in range(n_bins)]
        acc = [c / n if n else 0.0 for c, n in zip(pooled["correct_sum"], pooled["count"])]
        conf = [s / n if n else 0.0 for s, n in zip(pooled["confidence_sum"], pooled["count"])]
        used = [i for i in range(n_bins) if pooled["count"][i]]
        ax.bar([centres[i] for i in used], [acc[i] for i in used], width=width, edgecolor="black",
               linewidth=0.5, label="accuracy")
        ax.bar([centres[i] for i in used], [conf[i] - acc[i] for i in used], bottom=[acc[i] for i in used],
               width=width, color="red", alpha=0.3, label="gap")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        total = sum(pooled["count"])
        ece = ece_from_bins(pooled)
        ax.set_title(f"{label}\nECE {100 * ece:.1f}% ({total} predictions)", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7, loc="upper left")
    return fig


def plot_retrieval(records: Sequence[Record]):
    """Grouped bars of R@1/5/10, image-to-text and text-to-image, one group per (dataset, model) run."""
    keys = [k for k in records[0]["metrics"] if "_R@" in k]
    fig = _figure(max(4.0, 1.2 * len(keys) * len(records) ** 0.5 + 2), 3.4)
    ax = fig.subplots()
    width = 0.8 / len(records)
    for n, r in enumerate(records):
        xs = [i + n * width for i in range(len(keys))]
        ax.bar(xs, [100 * r["metrics"][k] for k in keys], width=width,
               label=f"{r['run']['dataset']} / {r['model']['spec']}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))],
                  [k.replace("image_to_text_", "I→T ").replace("text_to_image_", "T→I ") for k in keys], fontsize=8)
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_image_grid(images: Sequence, titles: Sequence[str] = (), cols: int = 8, size: float = 1.6, title: str = ""):
    """Images (paths or PIL) in a grid with a short title under each, e.g. search results with scores."""
    from PIL import Image

    rows = max(1, -(-len(images) // cols))
    fig = _figure(size * cols, (size + 0.35) * rows + (0.3 if title else 0))
    axes = fig.subplots(rows, cols, squeeze=False)
    for n, ax in enumerate(axes.flat):
        ax.axis("off")
        if n < len(images):
            img = images[n]
            if not isinstance(img, Image.Image):
                with Image.open(img) as im:
                    img = im.convert("RGB")
            ax.imshow(img)
            if n < len(titles):
                ax.set_title(titles[n], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
