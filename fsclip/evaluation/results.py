"""One JSON file per evaluation run: what was run (`RunSpec`), on what, and the metrics.

The file name is the run's id, so a finished run is found again by name (`--skip-existing`) and a
report can be rebuilt from any set of result files. Files are written atomically: an interrupted
run leaves no file, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fsclip._io import atomic_write
from fsclip.errors import DataError, UsageError

__all__ = ["SCHEMA", "TASKS", "RunSpec", "find_result", "load_results", "model_slug", "write_result"]

SCHEMA = 1
TASKS = ("zeroshot", "fewshot", "retrieval")
Task = Literal["zeroshot", "fewshot", "retrieval"]
ZERO_SHOT = "zero-shot"  # the method name zero-shot runs record, and the K=0 point of few-shot curves
RETRIEVAL = "retrieval"


def model_slug(spec: str) -> str:
    """A file-name-safe short name for a model spec; folders get a hash of their full path."""
    is_dir = os.path.isdir(spec)
    name = Path(spec).resolve().name if is_dir else spec
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    if is_dir:
        slug += "-" + hashlib.sha256(str(Path(spec).resolve()).encode()).hexdigest()[:6]
    return slug


@dataclass(frozen=True)
class RunSpec:
    """One evaluation run.

    Attributes:
        task: zeroshot, fewshot or retrieval.
        method: the adapter for few-shot runs (`fsclip.adapters.list_methods()`).
        shots: K images per class for few-shot training (CoOp: 1, 2, 4, 8, 16); 0 otherwise.
        seed: few-shot sampling and training seed (CoOp: 1, 2, 3).
        templates: prompt templates; None means the dataset's own (CoOp's per-dataset prompt).
        options: adapter options, as sorted (name, value) pairs.
    """

    task: Task
    model: str
    dataset: str
    method: str = ZERO_SHOT
    shots: int = 0
    seed: int = 0
    templates: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.task not in TASKS:
            raise UsageError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.task == "fewshot":
            if not isinstance(self.shots, int) or self.shots < 1:
                raise UsageError(f"shots must be an integer >= 1 for few-shot runs, got {self.shots!r}")
            if self.method in (ZERO_SHOT, RETRIEVAL):
                raise UsageError(f"method must be an adapter for few-shot runs, got {self.method!r}")
        else:
            expected = ZERO_SHOT if self.task == "zeroshot" else RETRIEVAL
            if self.method != expected or self.shots != 0:
                raise UsageError(f"{self.task} runs take no method or shots (got method={self.method!r}, "
                                 f"shots={self.shots})")
        object.__setattr__(self, "options", tuple(sorted((str(k), v) for k, v in self.options)))

    @property
    def run_id(self) -> str:
        """`task__dataset__model__method__kK__sS`, plus a hash when templates or options are set."""
        rid = f"{self.task}__{self.dataset}__{model_slug(self.model)}__{self.method}__k{self.shots}__s{self.seed}"
        if self.templates is not None or self.options:
            extra = json.dumps([self.templates, self.options], sort_keys=True, default=str)
            rid += "__" + hashlib.sha256(extra.encode()).hexdigest()[:8]
        return rid

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["options"] = dict(self.options)
        out["run_id"] = self.run_id
        return out


def write_result(out_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write `record` to `out_dir/<run id>.json` atomically; a NaN metric is an error, never written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{record['run']['run_id']}.json"
    try:
        text = json.dumps(record, indent=1, ensure_ascii=False, default=str, allow_nan=False) + "\n"
    except ValueError:
        raise DataError(f"run {record['run']['run_id']}: a metric is NaN or infinite; no result written") from None
    with atomic_write(path, "w") as f:
        f.write(text)
    return path


def _kind(value: Any, kind: str) -> bool:
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "count":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind == "text":
        return isinstance(value, str)
    if kind == "text or null":
        return value is None or isinstance(value, str)
    if kind == "numbers":
        return isinstance(value, list) and all(_kind(v, "number") for v in value)
    return isinstance(value, dict)  # "object"


_RUN = {"run_id": "text", "task": "text", "dataset": "text", "method": "text", "shots": "count", "seed": "count"}
_MODEL = {"spec": "text", "fingerprint": "text"}
_CLASSIFICATION = {"n": "count", "top1": "number", "mean_per_class_recall": "number", "ece": "number",
                   "calibration": "object"}


def _check(record: dict[str, Any], path: Path) -> None:
    """The fields reports and plots read, with their types: a wrong one is a `DataError` naming the file."""
    def need(where: str, fields: dict[str, str]) -> None:
        part = record
        for key in where.split(".") if where else ():
            part = part.get(key) if isinstance(part, dict) else None
        if not isinstance(part, dict):
            raise DataError(f"result file {str(path)!r}: {where} must be an object")
        for key, kind in fields.items():
            if not _kind(part.get(key), kind):
                value = repr(part.get(key))[:40] if key in part else "missing"
                raise DataError(f"result file {str(path)!r}: {where}.{key} must be a {kind}, got {value}")

    need("run", _RUN)
    need("model", _MODEL)
    need("metrics", {})
    task = record["run"]["task"]
    if task not in TASKS:
        raise DataError(f"result file {str(path)!r}: unknown task {task!r}; this fsclip reports {', '.join(TASKS)}")
    need("run", {"templates": "text or null"} if "templates" in record["run"] else {})
    need("run", {"options": "object"} if "options" in record["run"] else {})
    if task == RETRIEVAL:
        need("dataset", {"n_images": "count", "n_captions": "count"})
        recalls = {k: v for k, v in record["metrics"].items() if "_R@" in k}
        if not recalls or not all(_kind(v, "number") for v in recalls.values()):
            raise DataError(f"result file {str(path)!r}: metrics must hold numeric image_to_text_R@K and "
                            "text_to_image_R@K values")
        return
    need("metrics", _CLASSIFICATION)
    need("metrics.calibration", {"count": "numbers", "confidence_sum": "numbers", "correct_sum": "numbers"})
    need("metrics", {"group_recall": "object"} if "group_recall" in record["metrics"] else {})
    if any(v is not None and not _kind(v, "number") for v in record["metrics"].get("group_recall", {}).values()):
        raise DataError(f"result file {str(path)!r}: metrics.group_recall values must be numbers or null")
    if record["metrics"].get("confusion") is not None:
        need("dataset", {})
        if not isinstance(record["dataset"].get("classes"), list):
            raise DataError(f"result file {str(path)!r}: a confusion matrix needs dataset.classes")
    if task == "fewshot":
        need("timing", {"fit_seconds": "number"})


def _read(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"result file {str(path)!r} not found") from None
    except IsADirectoryError:
        raise DataError(f"result file {str(path)!r} is a folder") from None
    except OSError as e:
        raise DataError(f"result file {str(path)!r} cannot be read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"result file {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(record, dict) or not {"schema", "run", "metrics"} <= set(record):
        raise DataError(f"{str(path)!r} is not an fsclip evaluation result (no schema, run or metrics)")
    schema = record["schema"]
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise DataError(f"result file {str(path)!r}: unknown schema {schema!r}")
    if schema > SCHEMA:
        raise DataError(f"{str(path)!r} has result schema {schema}; this fsclip reads up to {SCHEMA}")
    _check(record, path)
    return record


def find_result(out_dir: str | os.PathLike, spec: RunSpec) -> dict[str, Any] | None:
    """The finished result of `spec` in `out_dir`, or None (also for an unreadable file: run it again)."""
    path = Path(out_dir) / f"{spec.run_id}.json"
    if not path.is_file():
        return None
    try:
        record = _read(path)
    except DataError:
        return None
    return record if record["run"].get("run_id") == spec.run_id else None


def load_results(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Result records from files and folders (every `*.json` in a folder), each tagged with its `_file`."""
    out = []
    for p in map(Path, paths):
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        for f in files:
            record = _read(f)
            record["_file"] = str(f)
            out.append(record)
    if not out:
        raise DataError("no result files given (pass results/*.json or a folder of them)")
    return out
