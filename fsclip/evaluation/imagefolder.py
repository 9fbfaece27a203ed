"""Any ImageFolder: `root/{train,val,test}/<class>/<image>`, or just `root/<class>/<image>`.

An optional `root/fsclip-dataset.json` sets the default prompt templates and named class groups whose
recall is reported separately: `{"templates": "shapes", "groups": {"novel": ["diamond", "ring"]}}`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fsclip.data import load_image_folder
from fsclip.errors import DataError
from fsclip.evaluation._splits import split_folders
from fsclip.evaluation.datasets import ClassificationData, DatasetSpec, register_dataset

__all__ = ["load_split_folders"]

logger = logging.getLogger(__name__)

METADATA = "fsclip-dataset.json"
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "valid"), "test": ("test",)}


def _find(root: Path, split: str) -> Path | None:
    return next((root / n for n in SPLIT_NAMES[split] if (root / n).is_dir()), None)


def _metadata(root: Path, templates: str) -> tuple[str, dict[str, tuple[str, ...]]]:
    file = root / METADATA
    if not file.is_file():
        return templates, {}
    try:
        meta = json.loads(file.read_text())
        groups = {str(k): tuple(str(c) for c in v) for k, v in meta.get("groups", {}).items()}
        return str(meta.get("templates", templates)), groups
    except (json.JSONDecodeError, AttributeError, TypeError) as e:
        raise DataError(f"{file}: expected {{\"templates\": NAME, \"groups\": {{NAME: [CLASS, ...]}}}} ({e})") from None


def load_split_folders(root: Path, name: str = "imagefolder", templates: str = "imagenet80") -> ClassificationData:
    """Split folders when there are (`test/` required, `train/` and `val/` optional), else a 50/20/30 split.

    Class order comes from `test/`; the other splits must have the same class folders.
    """
    if not root.is_dir():
        raise DataError(f"dataset {name!r}: {root} is not a folder")
    templates, groups = _metadata(root, templates)
    found = {s: _find(root, s) for s in SPLIT_NAMES}
    if found["test"] is None and found["train"] is None:
        logger.warning("%s: no train/ or test/ folder in %s; splitting the class folders 50/20/30 with seed 0",
                       name, root)
        train, val, test = split_folders(root)
        source = f"{root} (50/20/30 split, seed 0)"
    elif found["test"] is None:
        raise DataError(f"dataset {name!r}: {root} has train/ but no test/ folder")
    else:
        test = load_image_folder(found["test"])
        train, val = (load_image_folder(found[s], list(test.classes)) if found[s] else None for s in ("train", "val"))
        source = f"{root} ({', '.join(p.name for p in found.values() if p is not None)})"
    try:
        return ClassificationData(name, test, train, val, templates, groups, source=source)
    except ValueError as e:  # a group naming unknown classes
        raise DataError(f"{root / METADATA}: {e}") from None

register_dataset(DatasetSpec(
    "imagefolder", "classification", load_split_folders,
    description="your own folder: root/{train,val,test}/<class>/<image> or root/<class>/<image> (split 50/20/30)",
))
