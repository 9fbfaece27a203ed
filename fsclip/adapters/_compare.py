"""Transfer or scratch? The playbook's test, run beside a fit (`fit(..., compare_scratch=True)`).

The same architecture from random initialisation is trained on the same images, with the same
augmentation, seed and budget (`scratch`). Both record their validation accuracy along the way
(`val_curve`: reported only, nothing is chosen on it). If the transferred model neither ends better
nor reaches a good accuracy sooner, the domain is too far from the backbone's pretraining data.
"""

from __future__ import annotations

from typing import Any

from fsclip.adapters.base import Adapter

__all__ = ["SHARED_OPTIONS", "TARGET", "compare", "curve", "lines"]

SHARED_OPTIONS = ("seed", "crop_scale", "flip", "batch_size", "epochs", "iters")  # same data, augmentation, schedule
TARGET = 0.9  # "converged": reached this fraction of the better of the two final validation accuracies


def curve(adapter: Adapter) -> list[dict[str, Any]]:
    """Validation accuracy along the fit: the training checks, or one point at the end for a method that
    does not train by steps (a frozen-feature head is done once it is fitted)."""
    history = getattr(adapter, "train_result", {}).get("history") or []
    if history:
        return [{k: h[k] for k in ("step", "val_accuracy", "seconds") if k in h} for h in history]
    return [{"step": 0, "val_accuracy": round(adapter.metrics["val_accuracy"]["adapter"], 4),
             "seconds": adapter.metrics["budget"]["fit_seconds"]}]


def _run(adapter: Adapter) -> dict[str, Any]:
    result = getattr(adapter, "train_result", {})
    return {"method": adapter.name, "val_accuracy": round(adapter.metrics["val_accuracy"]["adapter"], 4),
            "fit_seconds": adapter.metrics["budget"]["fit_seconds"], "steps_run": result.get("steps_run", 0),
            "steps_per_epoch": result.get("steps_per_epoch"), "curve": curve(adapter)}


def _reached(run: dict[str, Any], target: float) -> dict[str, Any] | None:
    """The first check at or above `target`, with its epoch where the run counts them."""
    for point in run["curve"]:
        if point["val_accuracy"] >= target:
            out = dict(point)
            if run["steps_per_epoch"]:
                out["epoch"] = point["step"] // run["steps_per_epoch"]
            return out
    return None


def compare(transfer: Adapter, scratch: Adapter) -> dict[str, Any]:
    """Both runs (final accuracy, curve, time), when each reached `TARGET` of the better final accuracy,
    and the playbook's verdict. Differences of one validation image or less count as none."""
    a, b = _run(transfer), _run(scratch)
    n_val = transfer.metrics["val_images"]
    target = round(TARGET * max(a["val_accuracy"], b["val_accuracy"]), 4)
    reached = {"transfer": _reached(a, target), "scratch": _reached(b, target)}
    gap = a["val_accuracy"] - b["val_accuracy"]
    better = gap > 1.0 / n_val + 1e-9
    worse = gap < -1.0 / n_val - 1e-9
    rt, rs = reached["transfer"], reached["scratch"]
    faster = rt is not None and (rs is None or rt["seconds"] < rs["seconds"])
    if better or faster:
        why = " and ".join(w for w, ok in ((f"ends better ({gap:+.3f})", better),
                                           ("reaches the target sooner", faster)) if ok)
        verdict = f"transfer pays off: the pretrained model {why} than training from scratch"
    else:
        verdict = ("transfer neither ends better nor converges faster than training from scratch"
                   + (f" (scratch ends {-gap:.3f} higher)" if worse else "")
                   + ": this domain may be too far from the backbone's pretraining data; try another backbone, "
                     "more fine-tuning (full-ft), more data, or semi-supervised learning")
    return {"transfer": a, "scratch": b, "target": target, "target_rule": f"{TARGET:g} x the better final accuracy",
            "reached": reached, "transfer_ends_better": better, "transfer_converges_faster": faster,
            "verdict": verdict, "data": "validation images (reported only, used for no choice)"}


def _points(run: dict[str, Any], most: int = 8) -> str:
    pts = run["curve"]
    if len(pts) > most:  # evenly spaced checks, always the last
        step = (len(pts) - 1) / (most - 1)
        pts = [pts[round(i * step)] for i in range(most)]
    per = run["steps_per_epoch"]
    label = (lambda p: f"epoch {p['step'] // per}") if per else (lambda p: f"step {p['step']}")
    return ", ".join(f"{label(p)} {p['val_accuracy']:.3f}" for p in pts)


def lines(comparison: dict[str, Any]) -> list[str]:
    """The comparison as the CLI prints it."""
    out = ["compare with scratch (same data, augmentation, seed and budget; validation accuracy):"]
    width = max(len(comparison[k]["method"]) for k in ("transfer", "scratch"))
    for key in ("transfer", "scratch"):
        run = comparison[key]
        out.append(f"  {run['method']:<{width}}  final {run['val_accuracy']:.3f} after {run['steps_run']} steps, "
                   f"{run['fit_seconds']:.1f} s; curve: {_points(run)}")
    parts = []
    for key in ("transfer", "scratch"):
        hit = comparison["reached"][key]
        name = comparison[key]["method"]
        if hit is None:
            parts.append(f"{name} never")
        else:
            when = f"epoch {hit['epoch']}" if "epoch" in hit else f"step {hit['step']}"
            parts.append(f"{name} at {when} ({hit['seconds']:.1f} s)")
    out.append(f"  reached {comparison['target']:.3f} ({comparison['target_rule']}): {'; '.join(parts)}")
    out.append(f"  verdict: {comparison['verdict']}")
    return out
