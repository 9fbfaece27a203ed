"""Hugging Face `datasets` image datasets, from local files only.

`root` is either a dataset saved with `save_to_disk` (a `Dataset` or `DatasetDict` with an `Image`
column and a `ClassLabel` column), or a folder read with the `imagefolder` builder. Images that exist
as files are used in place; images stored inside the Arrow files are written once to fsclip's cache
(keyed by the dataset's fingerprint), because the encoders and adapters work on files.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fsclip._cache import cache_dir
from fsclip._io import atomic_dir
from fsclip.data import LabeledImages
from fsclip.errors import DataError
from fsclip.evaluation._splits import split_per_class
from fsclip.evaluation.datasets import ClassificationData, DatasetSpec, register_dataset

__all__ = ["load_hf"]

logger = logging.getLogger(__name__)

SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}
IMAGE_COLUMNS = ("image", "img", "picture")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class")


def _open(root: Path):
    import datasets

    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        ds = datasets.load_from_disk(str(root))
    else:
        try:
            ds = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(cache_dir("hf-datasets")))
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"dataset 'hf': cannot read {root} with the imagefolder builder: {e}") from None
    return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})


def _column(features, kind: type, preferred: tuple[str, ...], what: str, root: Path) -> str:
    found = [name for name, f in features.items() if isinstance(f, kind)]
    if not found:
        raise DataError(f"dataset 'hf' at {root}: no {what} column (columns: {', '.join(features)})")
    return next((n for n in preferred if n in found), found[0])


def _files(split, image_col: str, where: Path) -> list[Path]:
    """Paths of the split's images: the original files when they exist, else copies in `where`."""
    import datasets

    rows = split.cast_column(image_col, datasets.Image(decode=False))[image_col]
    if all(r["bytes"] is None and r["path"] and Path(r["path"]).is_file() for r in rows):
        return [Path(r["path"]) for r in rows]
    names = [f"{i:07d}{Path(r['path'] or '').suffix}" for i, r in enumerate(rows)]
    if not (where / ".complete").exists():
        logger.info("writing %d images of %s to %s (once)", len(rows), split.info.dataset_name or "dataset", where)
        with atomic_dir(where, overwrite=True) as tmp:
            for name, r in zip(names, rows):
                data = r["bytes"] if r["bytes"] is not None else Path(r["path"]).read_bytes()
                (tmp / name).write_bytes(data)
            (tmp / ".complete").write_text("")
    return [where / n for n in names]


def load_hf(root: Path, name: str = "hf", templates: str = "imagenet80") -> ClassificationData:
    import datasets

    if not root.is_dir():
        raise DataError(f"dataset {name!r}: {root} is not a folder")
    dd = _open(root)
    splits = {s: next((dd[n] for n in names if n in dd), None) for s, names in SPLIT_NAMES.items()}
    first = next(s for s in dd.values())
    image_col = _column(first.features, datasets.Image, IMAGE_COLUMNS, "Image", root)
    label_col = _column(first.features, datasets.ClassLabel, LABEL_COLUMNS, "ClassLabel", root)
    classes = tuple(n.replace("_", " ") for n in first.features[label_col].names)
    parts: dict[str, LabeledImages | None] = {}
    for s, split in splits.items():
        if split is None:
            parts[s] = None
            continue
        where = cache_dir("eval-images") / f"{root.name}-{split._fingerprint}"
        paths = _files(split, image_col, where)
        parts[s] = LabeledImages(tuple(paths), tuple(int(t) for t in split[label_col]), classes)
    source = f"{root} (Hugging Face datasets: {', '.join(dd)})"
    if parts["test"] is None:
        if parts["train"] is None:
            raise DataError(f"dataset {name!r} at {root}: no train or test split (splits: {', '.join(dd)})")
        logger.warning("%s: no test split in %s; splitting train 50/20/30 per class with seed 0", name, root)
        parts["train"], parts["val"], parts["test"] = split_per_class(parts["train"])
        source += ", train split 50/20/30 (seed 0)"
    return ClassificationData(name, parts["test"], parts["train"], parts["val"], templates, source=source)


register_dataset(DatasetSpec(
    "hf", "classification", load_hf,
    description="Hugging Face datasets: a save_to_disk folder with Image + ClassLabel columns, or an imagefolder",
))
