"""Evaluation datasets: one registry of loaders, each reading a local folder into labelled splits or captions.

A loader module calls `register_dataset` once per dataset it reads (see `coop.py`, `imagefolder.py`,
`hf_datasets.py`, `captions.py`, `shapes.py`); `list_datasets()` is derived from the registry.
Nothing is ever downloaded: a missing folder is a `DataError` that says what was expected where.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fsclip._io import atomic_dir
from fsclip.data import LabeledImages
from fsclip.errors import DataError, UsageError

__all__ = [
    "CaptionData",
    "ClassificationData",
    "DatasetSpec",
    "get_dataset",
    "list_datasets",
    "load_dataset",
    "register_dataset",
]

logger = logging.getLogger(__name__)

Task = Literal["classification", "retrieval"]


@dataclass(frozen=True)
class ClassificationData:
    """Labelled splits of one dataset. `train`/`val` may be None (an evaluation-only set).

    Attributes:
        groups: named subsets of classes whose mean recall is reported too (e.g. "novel" shapes).
        source: where the splits came from (a split file, folders), recorded in every result.
    """

    name: str
    test: LabeledImages
    train: LabeledImages | None = None
    val: LabeledImages | None = None
    templates: str = "imagenet80"
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self):
        for split in ("train", "val"):
            part = getattr(self, split)
            if part is not None and tuple(part.classes) != tuple(self.test.classes):
                raise ValueError(f"{split} classes differ from test classes in dataset {self.name!r}")
        for group, names in self.groups.items():
            unknown = sorted(set(names) - set(self.test.classes))
            if unknown:
                raise ValueError(f"group {group!r} names unknown classes: {unknown}")

    @property
    def classes(self) -> tuple[str, ...]:
        return self.test.classes

    def split(self, name: str) -> LabeledImages:
        part = getattr(self, name, None) if name in ("train", "val", "test") else None
        if part is None:
            have = [s for s in ("train", "val", "test") if getattr(self, s) is not None]
            raise UsageError(f"dataset {self.name!r} has no {name!r} split; it has: {', '.join(have)}")
        return part


@dataclass(frozen=True)
class CaptionData:
    """Images with one or more captions each, for image-text retrieval."""

    name: str
    paths: tuple[Path, ...]
    captions: tuple[tuple[str, ...], ...]
    source: str = ""

    def __post_init__(self):
        if len(self.paths) != len(self.captions):
            raise ValueError(f"paths ({len(self.paths)}) and captions ({len(self.captions)}) differ in length")
        empty = [str(p) for p, caps in zip(self.paths, self.captions) if not caps]
        if empty:
            raise ValueError(f"images without captions: {empty[:3]}")

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class DatasetSpec:
    """How to find and read one dataset.

    Attributes:
        folder: the dataset's conventional folder under the data root (CoOp's names), or None when the
            root given is the dataset itself (ImageFolder, HF datasets, caption files).
        load: reads the dataset folder; raises `DataError` naming what is missing.
        templates: the prompt template set zero-shot and adapters use by default.
        generate: for synthetic datasets, writes the dataset folder when it is missing.
    """

    name: str
    task: Task
    load: Callable[[Path], ClassificationData | CaptionData]
    folder: str | None = None
    templates: str = "imagenet80"
    description: str = ""
    generate: Callable[[Path], None] | None = None

    def __post_init__(self):
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"name must be letters, digits, '-' or '_', got {self.name!r}")
        if self.task not in ("classification", "retrieval"):
            raise ValueError(f"task must be 'classification' or 'retrieval', got {self.task!r}")

    def locate(self, root: str | os.PathLike) -> Path:
        """`root/<folder>` when it exists (CoOp's DATA layout), else `root` itself (the dataset folder)."""
        root = Path(root).expanduser()
        if self.folder and (root / self.folder).is_dir():
            return root / self.folder
        if self.folder and self.generate is not None:
            logger.info("writing dataset %s to %s (first use)", self.name, root / self.folder)
            with atomic_dir(root / self.folder) as tmp:
                self.generate(tmp)
            return root / self.folder
        if not root.exists():
            where = f"{root}/{self.folder} or {root}" if self.folder else str(root)
            raise DataError(f"dataset {self.name!r}: {where} does not exist (nothing is downloaded; see the README's Evaluation section)")
        return root


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset under its name; a name can be registered only once."""
    if spec.name in _DATASETS:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    _DATASETS[spec.name] = spec
    return spec


def list_datasets(task: Task | None = None) -> list[str]:
    """Registered dataset names, sorted; only those of `task` when given."""
    return sorted(n for n, s in _DATASETS.items() if task is None or s.task == task)


def get_dataset(name: str, task: Task | None = None) -> DatasetSpec:
    spec = _DATASETS.get(name)
    if spec is None:
        raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets(task))}")
    if task is not None and spec.task != task:
        raise UsageError(
            f"dataset {name!r} is for {spec.task}, not {task}; choose one of: {', '.join(list_datasets(task))}"
        )
    return spec


def load_dataset(name: str, root: str | os.PathLike, task: Task | None = None) -> ClassificationData | CaptionData:
    """Read dataset `name` from under `root` (the data root or the dataset's own folder)."""
    spec = get_dataset(name, task)
    return spec.load(spec.locate(root))
