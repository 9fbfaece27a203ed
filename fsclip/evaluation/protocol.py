"""The evaluation protocol: zero-shot, CoOp-style few-shot and retrieval runs, each to one result record.

Few-shot follows CoOp: K images per class drawn from the train split with the run's seed, and
min(K, 4) per class for validation drawn from the val split (or, for datasets without one such as
ImageNet, from the train images not drawn as shots; a class with fewer validation images gives all it
has, as in CoOp); evaluation on the full test split.

Under torchrun / accelerate launch `run_all` spreads the runs over the ranks (each run in one
process), after the ranks have encoded the evaluation splits together.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fsclip._version import __version__
from fsclip.backends import Backend
from fsclip.backends.base import no_text_tower
from fsclip.data import LabeledImages, sample_shots
from fsclip.distributed import world
from fsclip.errors import DataError, UsageError
from fsclip.evaluation.datasets import CaptionData, ClassificationData, load_dataset
from fsclip.evaluation.features import split_features
from fsclip.evaluation.metrics import classification_metrics, retrieval_metrics
from fsclip.evaluation.results import RETRIEVAL, SCHEMA, ZERO_SHOT, RunSpec, find_result, write_result

__all__ = ["DATASET_TASK", "RunOutcome", "few_shot_split", "plan_runs", "run_all", "run_one"]

logger = logging.getLogger(__name__)

# the kind of dataset each task reads
DATASET_TASK = {"zeroshot": "classification", "fewshot": "classification", "retrieval": "retrieval"}
TEXT_TASKS = ("zeroshot", "retrieval")  # tasks that need a text tower


def _sample_up_to(data: LabeledImages, per_class: int, seed: int) -> LabeledImages:
    """Like `sample_shots`, but a class with fewer images gives all it has (CoOp does so for validation)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c, idx in data.by_class().items():
        if not idx:
            raise DataError(f"class {data.classes[c]!r} has no validation images")
        chosen.extend(sorted(rng.choice(idx, min(per_class, len(idx)), replace=False).tolist()))
    return data.subset(chosen)


def few_shot_split(data: ClassificationData, shots: int, seed: int) -> tuple[LabeledImages, LabeledImages]:
    """(train, val) of one few-shot run: K per class from train, min(K, 4) per class for validation."""
    from fsclip.adapters import holdout_split

    if data.train is None:
        raise DataError(f"dataset {data.name!r} has no train split; few-shot runs need one")
    if data.val is None:
        return holdout_split(data.train, shots=shots, seed=seed)
    return sample_shots(data.train, shots, seed), _sample_up_to(data.val, min(shots, 4), seed)


def _header(spec: RunSpec, backend: Backend, data: ClassificationData | CaptionData) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "fsclip_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": spec.to_dict(),
        "model": {"spec": spec.model, "backend": backend.name, "fingerprint": backend.fingerprint,
                  "device": str(backend.device), "dtype": str(backend.dtype).removeprefix("torch."),
                  "runtime": backend.runtime},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        "dataset": {"name": data.name, "source": data.source},
    }


def _classification_record(spec, backend, data: ClassificationData, probs, targets, skipped) -> dict[str, Any]:
    record = _header(spec, backend, data)
    record["dataset"].update(classes=list(data.classes), groups={k: list(v) for k, v in data.groups.items()},
                             n_test=len(data.test), skipped_images=len(skipped))
    record["metrics"] = classification_metrics(probs, targets, data.classes, data.groups)
    return record


def _evaluated_images(data: ClassificationData | CaptionData) -> tuple[list, str]:
    """The images a run encodes with the base model, and the tag of their feature cache."""
    if isinstance(data, CaptionData):
        return list(data.paths), f"{data.name}-images"
    return list(data.test.paths), f"{data.name}-test"


def _test_features(backend: Backend, data: ClassificationData, batch_size: int, progress: bool):
    if len(data.test) == 0:  # a metric over no images would read as 0% accuracy, not as the mistake it is
        raise DataError(f"dataset {data.name!r} has an empty test split ({data.source})")
    paths, tag = _evaluated_images(data)
    feats = split_features(backend, paths, tag, batch_size=batch_size, progress=progress)
    if len(feats.indices) == 0:
        path, why = feats.errors[0]
        raise DataError(f"dataset {data.name!r}: none of the {len(data.test)} test images could be read "
                        f"(e.g. {path}: {why})")
    targets = torch.tensor(data.test.targets, dtype=torch.long)[feats.indices]
    return feats, targets


def run_zeroshot(spec: RunSpec, backend: Backend, data: ClassificationData, batch_size: int = 32,
                 progress: bool = False) -> dict[str, Any]:
    from fsclip.zeroshot import ZeroShotClassifier

    start = time.perf_counter()
    feats, targets = _test_features(backend, data, batch_size, progress)
    encoded = time.perf_counter()
    clf = ZeroShotClassifier(backend, data.classes, spec.templates or data.templates)
    probs = clf.predict_proba(feats.features.to(backend.device)).float().cpu()  # (N, C)
    record = _classification_record(spec, backend, data, probs, targets, feats.errors)
    record["timing"] = {"encode_seconds": round(encoded - start, 3), "features_cached": feats.cached,
                        "predict_seconds": round(time.perf_counter() - encoded, 3)}
    return record


def run_fewshot(spec: RunSpec, backend: Backend, data: ClassificationData, batch_size: int = 32,
                progress: bool = False) -> dict[str, Any]:
    from fsclip.adapters import fit

    train, val = few_shot_split(data, spec.shots, spec.seed)
    start = time.perf_counter()
    adapter = fit(backend, train, method=spec.method, val=val, progress=progress, seed=spec.seed,
                  templates=spec.templates or data.templates, **dict(spec.options))
    fitted = time.perf_counter()
    feats, targets = _test_features(backend, data, batch_size, progress)
    if adapter.frozen_backbone:  # the base model's test features are the adapter's input: reuse the cache
        probs = adapter.proba_from_features(feats.features)
    else:  # the adapter changed the image tower: encode the test images with it
        paths = [data.test.paths[i] for i in feats.indices.tolist()]
        probs = adapter.predict_proba(paths, batch_size=batch_size)
    probs = probs.float().cpu()
    record = _classification_record(spec, backend, data, probs, targets, feats.errors)
    record["run"]["method"] = adapter.name  # `auto` records what the advisor chose
    record["dataset"].update(n_train=len(train), n_val=len(val))
    record["adapter"] = {k: v for k, v in adapter.metrics.items() if k != "advice"} | {
        "config": adapter.config.to_dict(), "advice": adapter.metrics.get("advice")}
    record["timing"] = {"fit_seconds": round(fitted - start, 3), "features_cached": feats.cached,
                        "predict_seconds": round(time.perf_counter() - fitted, 3)}
    return record


def run_retrieval(spec: RunSpec, backend: Backend, data: CaptionData, batch_size: int = 32,
                  progress: bool = False) -> dict[str, Any]:
    start = time.perf_counter()
    paths, tag = _evaluated_images(data)
    feats = split_features(backend, paths, tag, batch_size=batch_size, progress=progress)
    if len(feats.indices) == 0:
        raise DataError(f"dataset {data.name!r}: no readable captioned images ({data.source})")
    position = {int(i): n for n, i in enumerate(feats.indices.tolist())}  # image index -> feature row
    texts, owners = [], []
    for i, caps in enumerate(data.captions):
        if i in position:  # captions of images that failed to decode cannot be retrieved: left out
            texts.extend(caps)
            owners.extend([position[i]] * len(caps))
    encoded = time.perf_counter()
    text = backend.encode_texts(texts).float().cpu()  # (M, D)
    record = _header(spec, backend, data)
    record["dataset"].update(n_images=len(feats.indices), n_captions=len(texts), skipped_images=len(feats.errors))
    record["metrics"] = retrieval_metrics(feats.features, text, torch.tensor(owners, dtype=torch.long))
    record["timing"] = {"encode_seconds": round(encoded - start, 3), "features_cached": feats.cached,
                        "text_seconds": round(time.perf_counter() - encoded, 3)}
    return record


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "zeroshot": run_zeroshot, "fewshot": run_fewshot, "retrieval": run_retrieval,
}


def plan_runs(task: str, model: str, dataset: str, methods: Sequence[str] = (), shots: Sequence[int] = (),
              seeds: Sequence[int] = (), templates: str | None = None,
              options: dict[str, Any] | None = None) -> list[RunSpec]:
    """Every run of one command: few-shot is methods x shots x seeds; the other tasks are one run."""
    opts = tuple((options or {}).items())
    if task == "fewshot":
        return [RunSpec(task, model, dataset, m, k, s, templates, opts) for m in methods for k in shots for s in seeds]
    method = RETRIEVAL if task == "retrieval" else ZERO_SHOT
    return [RunSpec(task, model, dataset, method, templates=templates, options=opts)]


@dataclass(frozen=True)
class RunOutcome:
    spec: RunSpec
    path: Path
    record: dict[str, Any]
    skipped: bool  # True: an existing result was kept (--skip-existing)


def run_one(spec: RunSpec, backend: Backend, data: ClassificationData | CaptionData, out_dir: str | Path,
            batch_size: int = 32, progress: bool = False) -> RunOutcome:
    record = RUNNERS[spec.task](spec, backend, data, batch_size=batch_size, progress=progress)
    return RunOutcome(spec, write_result(out_dir, record), record, False)


def run_all(specs: Sequence[RunSpec], root: str | Path, out_dir: str | Path, *, skip_existing: bool = False,
            load_backend: Callable[[str], Backend] | None = None, batch_size: int = 32,
            progress: bool = False) -> list[RunOutcome]:
    """Run `specs` in order, loading each model and dataset once, and only if some run needs it.

    With `skip_existing`, a run whose result file exists is kept when it was made with the same model
    weights (fingerprint); a result from other weights under the same spec is run again.

    Under torchrun / accelerate launch the ranks first encode each evaluated split together (a part
    each, into the feature cache), then run i goes to rank i mod the number of ranks, in one process,
    and that rank writes its result file. Every rank returns every outcome, in the order of `specs`.
    """
    if load_backend is None:
        from fsclip.backends import load_model as load_backend
    backends: dict[str, Backend] = {}
    datasets: dict[str, ClassificationData | CaptionData] = {}

    def backend(spec: RunSpec) -> Backend:
        if spec.model not in backends:
            backends[spec.model] = load_backend(spec.model)
        return backends[spec.model]

    def dataset(spec: RunSpec) -> ClassificationData | CaptionData:
        if spec.dataset not in datasets:
            datasets[spec.dataset] = load_dataset(spec.dataset, root, DATASET_TASK[spec.task])
        return datasets[spec.dataset]

    def done(spec: RunSpec, warn: bool = True) -> dict[str, Any] | None:
        existing = find_result(out_dir, spec) if skip_existing else None
        if existing is not None and not backend(spec).matches_fingerprint(existing["model"]["fingerprint"]):
            if warn:
                logger.warning("%s: result was made with other weights of %s (fingerprint %s, now %s); running again",
                               spec.run_id, spec.model, existing["model"]["fingerprint"], backend(spec).fingerprint)
            return None
        return existing

    def check(spec: RunSpec) -> None:
        if spec.task in TEXT_TASKS and not backend(spec).has_text:
            raise UsageError(no_text_tower(spec.model, f"{spec.task} needs one; evaluate it with `fsclip eval "
                                                       "fewshot`"))

    def run(spec: RunSpec) -> RunOutcome:
        existing = done(spec)
        if existing is not None:
            logger.info("%s: already done, skipped", spec.run_id)
            return RunOutcome(spec, Path(out_dir) / f"{spec.run_id}.json", existing, True)
        data = dataset(spec)  # before the model: a bad dataset is found without loading one
        check(spec)
        outcome = run_one(spec, backend(spec), data, out_dir, batch_size, progress)
        logger.info("%s: done", spec.run_id)
        return outcome

    if world.size() == 1:
        return [run(spec) for spec in tqdm(specs, desc="runs", unit="run",
                                           disable=None if progress and len(specs) > 1 else True)]

    def needed() -> list[tuple[str, str]]:  # (model, dataset) pairs some run needs, each loaded here
        todo = [s for s in specs if done(s, warn=False) is None]
        for s in todo:
            dataset(s)
            check(s)
        return list(dict.fromkeys((s.model, s.dataset) for s in todo))

    # the evaluated images of each, encoded once, a part per rank (a loading error stops every rank)
    for pair in world.gather_results(needed)[0]:
        spec = next(s for s in specs if (s.model, s.dataset) == pair)
        paths, tag = _evaluated_images(dataset(spec))
        if paths:
            split_features(backend(spec), paths, tag, batch_size=batch_size, progress=progress)
    rank, ranks = world.rank(), world.size()

    def my_runs() -> list[tuple[int, RunOutcome]]:
        with world.alone():  # each run in one process
            return [(i, run(spec)) for i, spec in enumerate(specs) if i % ranks == rank]

    return [outcome for _, outcome in sorted(pair for mine in world.gather_results(my_runs) for pair in mine)]
