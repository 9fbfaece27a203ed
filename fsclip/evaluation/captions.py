"""Image-caption datasets for retrieval (Flickr30k, COCO and your own), from local caption files.

Caption files understood (the format is detected from the content):
- Karpathy split JSON (`dataset_flickr30k.json`, `dataset_coco.json`): `{"images": [{"filename",
  "filepath"?, "split", "sentences": [{"raw"}]}]}`; only the chosen split (default `test`) is read;
- COCO annotations (`captions_val2017.json`): `{"images": [{"id", "file_name"}], "annotations":
  [{"image_id", "caption"}]}`;
- Flickr token files (`results_20130124.token`): `name.jpg#0<TAB>caption` per line;
- CSV with an `image` and a `caption` column (e.g. Flickr8k's `captions.txt`), one row per caption.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from fsclip.errors import DataError
from fsclip.evaluation.datasets import CaptionData, DatasetSpec, register_dataset

__all__ = ["read_captions"]


def _karpathy(raw: dict, split: str) -> list[tuple[str, list[str]]]:
    rows = [im for im in raw["images"] if "split" not in im or im["split"] == split]
    return [(str(Path(im.get("filepath", ""), im["filename"])), [s["raw"].strip() for s in im["sentences"]])
            for im in rows]


def _coco(raw: dict) -> list[tuple[str, list[str]]]:
    caps: dict[int, list[str]] = {}
    for a in raw["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    return [(im["file_name"], caps[im["id"]]) for im in raw["images"] if im["id"] in caps]


def _tokens(text: str) -> list[tuple[str, list[str]]]:
    caps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip():
            key, _, cap = line.partition("\t")
            caps.setdefault(key.rsplit("#", 1)[0], []).append(cap.strip())
    return list(caps.items())


def _csv(text: str, file: Path) -> list[tuple[str, list[str]]]:
    reader = csv.DictReader(text.splitlines())
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    if "image" not in fields or "caption" not in fields:
        raise DataError(f"{file}: a CSV caption file needs 'image' and 'caption' columns, has {fields}")
    caps: dict[str, list[str]] = {}
    for row in reader:
        row = {k.strip().lower(): v for k, v in row.items()}
        caps.setdefault(row["image"].strip(), []).append(row["caption"].strip())
    return list(caps.items())


def _parse(file: Path, split: str) -> list[tuple[str, list[str]]]:
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{file} is not valid JSON: {e}") from None
        if isinstance(raw, dict) and isinstance(raw.get("annotations"), list):
            return _coco(raw)
        if isinstance(raw, dict) and isinstance(raw.get("images"), list):
            return _karpathy(raw, split)
        raise DataError(f"{file}: neither Karpathy ('images' with 'sentences') nor COCO ('annotations') JSON")
    first = text.lstrip().split("\n", 1)[0]
    return _tokens(text) if "\t" in first and "#" in first.split("\t")[0] else _csv(text, file)


def read_captions(file: Path, image_dirs: Sequence[Path], name: str = "captions", split: str = "test") -> CaptionData:
    """Images and their captions from `file`; image paths are resolved against the first of `image_dirs`
    that holds the first image."""
    entries = _parse(file, split)
    if not entries:
        raise DataError(f"{file}: no images with captions (split {split!r})")
    base = next((d for d in image_dirs if (d / entries[0][0]).is_file()), None)
    if base is None:
        tried = ", ".join(str(d) for d in image_dirs)
        raise DataError(f"{file}: image {entries[0][0]!r} not found under {tried}")
    missing = [n for n, _ in entries if not (base / n).is_file()]
    if missing:
        raise DataError(f"{file}: {len(missing)} of {len(entries)} images not found under {base}, e.g. {missing[0]}")
    return CaptionData(name, tuple(base / n for n, _ in entries), tuple(tuple(c) for _, c in entries),
                       source=f"{file} ({split} split)" if file.suffix == ".json" else str(file))


def _load(folder: Path, *, name: str, files: Sequence[str], image_dirs: Sequence[str]) -> CaptionData:
    found = [folder / f for f in files if (folder / f).is_file()]
    if not found:  # any Karpathy-style or token file
        found = sorted(folder.glob("dataset_*.json")) + sorted(folder.glob("*.token"))
    if not found:
        raise DataError(f"dataset {name!r}: no caption file in {folder} (looked for {', '.join(files)})")
    return read_captions(found[0], [folder / d for d in image_dirs], name)


register_dataset(DatasetSpec(
    "flickr30k", "retrieval",
    partial(_load, name="flickr30k", files=("dataset_flickr30k.json", "results_20130124.token", "captions.txt"),
            image_dirs=("flickr30k-images", "images", "")),
    folder="flickr30k", description="Flickr30k, Karpathy test split (1,000 images, 5 captions each)",
))
register_dataset(DatasetSpec(
    "coco", "retrieval",
    partial(_load, name="coco", files=("dataset_coco.json", "annotations/captions_val2017.json",
                                        "annotations/captions_val2014.json"),
            image_dirs=("", "images", "val2017", "val2014")),
    folder="coco", description="MS-COCO, Karpathy 5k test split (dataset_coco.json) or captions_val2017.json",
))
register_dataset(DatasetSpec(
    "captions", "retrieval",
    partial(_load, name="captions", files=("captions.json", "captions.txt", "captions.csv", "captions.token"),
            image_dirs=("", "images")),
    description="your own: a folder with images and a caption file (Karpathy/COCO JSON, token file or CSV)",
))
