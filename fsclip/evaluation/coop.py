"""The 11 datasets of the CoOp few-shot protocol, read from CoOp's folder layout (its DATASETS.md).

Each dataset lives in `DATA/<folder>/`. Where CoOp's `split_zhou_<Name>.json` is present its
train/val/test split is used as is, so numbers compare with the papers. Without it, datasets that are
one folder per class are split 50/20/30 per class with a fixed seed (as CoOp does when it creates the
file) and a warning says the numbers are not comparable; the others need the split file.

Class names follow CoOp: the split file's names, with `_` read as a space (CoOp does that when it fills
the prompt). ImageNet and FGVC-Aircraft have no split file: ImageNet reads `images/train` and
`images/val` (val is the test set; fsclip draws the validation shots from train, not from the test
set as CoOp does), FGVC-Aircraft its own `images_variant_*.txt` lists.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

from fsclip.data import LabeledImages
from fsclip.errors import DataError
from fsclip.evaluation._splits import SPLITS, split_folders
from fsclip.evaluation.datasets import ClassificationData, DatasetSpec, register_dataset
from fsclip.images import IMAGE_EXTENSIONS

__all__ = ["COOP_DATASETS", "read_split_file"]

logger = logging.getLogger(__name__)

CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH_NAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
}


def _check_exist(paths: list[Path], where: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{where}: {len(missing)} of {len(paths)} image(s) not found, e.g. {missing[0]}")


def read_split_file(file: Path, image_dir: Path) -> tuple[LabeledImages, LabeledImages, LabeledImages]:
    """CoOp's `split_zhou_*.json`: `{"train"|"val"|"test": [[relative path, label, class name], ...]}`."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or any(not isinstance(raw.get(s), list) for s in SPLITS):
        raise DataError(f"{file} must map train, val and test to lists of [path, label, class name]")
    names: dict[int, str] = {}
    for split in SPLITS:
        for item in raw[split]:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and isinstance(item[2], str)
                    and isinstance(item[1], int) and not isinstance(item[1], bool)):
                raise DataError(f"{file}: {split} entry {item!r} is not [path, integer label, class name]")
            label, name = item[1], item[2].replace("_", " ")
            if names.setdefault(label, name) != name:
                raise DataError(f"{file}: label {label} is both {names[label]!r} and {name!r}")
    if sorted(names) != list(range(len(names))):
        raise DataError(f"{file}: labels must be 0..{len(names) - 1}, got {len(names)} distinct values")
    classes = tuple(names[i] for i in range(len(names)))
    out = []
    for split in SPLITS:
        paths = [image_dir / str(item[0]) for item in raw[split]]
        _check_exist(paths, f"{file.name} ({split})")
        out.append(LabeledImages(tuple(paths), tuple(int(item[1]) for item in raw[split]), classes))
    return out[0], out[1], out[2]


def _load_with_split(
    folder: Path, *, name: str, split_file: str, image_dir: str, templates: str,
    fallback: Callable[[Path], tuple[LabeledImages, LabeledImages, LabeledImages]] | None = None,
) -> ClassificationData:
    images = folder / image_dir if image_dir else folder
    file = folder / split_file
    if file.is_file():
        train, val, test = read_split_file(file, images)
        source = f"{file} (CoOp split)"
    elif fallback is not None and images.is_dir():
        logger.warning("%s: no %s in %s; splitting the class folders 50/20/30 with seed 0 (numbers are not "
                       "comparable with published ones)", name, split_file, folder)
        train, val, test = fallback(images)
        source = f"{images} (50/20/30 split, seed 0)"
    else:
        raise DataError(f"dataset {name!r}: {file} not found (get CoOp's split_zhou_*.json files, see the README's Evaluation section)")
    return ClassificationData(name, test, train, val, templates, source=source)


def _load_imagenet(folder: Path, templates: str) -> ClassificationData:
    names_file = folder / "classnames.txt"
    if not names_file.is_file():
        raise DataError(f"dataset 'imagenet': {names_file} not found (lines '<wnid> <class name>', as in CoOp)")
    wnids: dict[str, str] = {}
    for line in names_file.read_text().splitlines():
        if line.strip():
            wnid, _, cname = line.strip().partition(" ")
            wnids[wnid] = cname.strip()
    order = sorted(wnids)  # CoOp labels the sorted wnid folders
    splits = {}
    for split, sub in (("train", "train"), ("test", "val")):
        root = folder / "images" / sub
        if not root.is_dir():
            raise DataError(f"dataset 'imagenet': {root} not found (one folder per wnid)")
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        unknown = sorted(set(present) - set(wnids))
        if unknown:
            raise DataError(f"dataset 'imagenet': folders not in classnames.txt: {unknown[:5]}")
        paths, targets = [], []
        for label, wnid in enumerate(order):
            sub_dir = root / wnid
            files = sorted(f for f in sub_dir.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) if sub_dir.is_dir() else []
            paths.extend(files)
            targets.extend([label] * len(files))
        splits[split] = LabeledImages(tuple(paths), tuple(targets), tuple(wnids[w] for w in order))
    return ClassificationData("imagenet", splits["test"], splits["train"], None, templates,
                              source=f"{folder}/images/{{train,val}}")


def _load_aircraft(folder: Path, templates: str) -> ClassificationData:
    variants = folder / "variants.txt"
    if not variants.is_file():
        raise DataError(f"dataset 'fgvc-aircraft': {variants} not found (FGVC-Aircraft's data/ folder, as in CoOp)")
    classes = tuple(v.strip() for v in variants.read_text().splitlines() if v.strip())
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in SPLITS:
        file = folder / f"images_variant_{split}.txt"
        if not file.is_file():
            raise DataError(f"dataset 'fgvc-aircraft': {file} not found")
        paths, targets = [], []
        for line in file.read_text().splitlines():
            if not line.strip():
                continue
            image, _, variant = line.strip().partition(" ")
            if variant not in index:
                raise DataError(f"{file}: variant {variant!r} is not in variants.txt")
            paths.append(folder / "images" / f"{image}.jpg")
            targets.append(index[variant])
        _check_exist(paths, file.name)
        splits[split] = LabeledImages(tuple(paths), tuple(targets), classes)
    return ClassificationData("fgvc-aircraft", splits["test"], splits["train"], splits["val"], templates,
                              source=f"{folder}/images_variant_*.txt")


def _coop(name: str, folder: str, images: str, split_file: str, description: str,
          fallback: Callable[[Path], tuple[LabeledImages, LabeledImages, LabeledImages]] | None = None) -> DatasetSpec:
    """A dataset read from CoOp's split file, with CoOp's hand-written template (`coop-<name>`)."""
    templates = f"coop-{name}"
    load = partial(_load_with_split, name=name, split_file=split_file, image_dir=images, templates=templates,
                   fallback=fallback)
    return DatasetSpec(name, "classification", load, folder=folder, templates=templates,
                       description=f"{description} (CoOp: {folder}/{split_file})")


def _folders(ignored: tuple[str, ...] = (), renames: Mapping[str, str] | None = None):
    return partial(split_folders, ignored=ignored, renames=renames or {})


register_dataset(_coop("caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                       "Caltech101, 100 object classes", _folders(CALTECH_IGNORED, CALTECH_NAMES)))
register_dataset(_coop("dtd", "dtd", "images", "split_zhou_DescribableTextures.json",
                       "Describable Textures, 47 classes", _folders()))
register_dataset(_coop("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json",
                       "EuroSAT RGB, 10 land-use classes", _folders(renames=EUROSAT_NAMES)))
register_dataset(_coop("flowers102", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                       "Oxford Flowers, 102 species"))
register_dataset(_coop("food101", "food-101", "images", "split_zhou_Food101.json", "Food-101, 101 dishes", _folders()))
register_dataset(_coop("oxford-pets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
                       "Oxford-IIIT Pets, 37 breeds"))
register_dataset(_coop("stanford-cars", "stanford_cars", "", "split_zhou_StanfordCars.json",
                       "Stanford Cars, 196 models"))
register_dataset(_coop("sun397", "sun397", "SUN397", "split_zhou_SUN397.json", "SUN397, 397 scene categories"))
register_dataset(_coop("ucf101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
                       "UCF101 middle frames, 101 actions"))
register_dataset(DatasetSpec("imagenet", "classification", partial(_load_imagenet, templates="coop-imagenet"),
                             folder="imagenet", templates="coop-imagenet",
                             description="ImageNet-1k (CoOp: imagenet/images/{train,val}, classnames.txt)"))
register_dataset(DatasetSpec("fgvc-aircraft", "classification",
                             partial(_load_aircraft, templates="coop-fgvc-aircraft"), folder="fgvc_aircraft",
                             templates="coop-fgvc-aircraft",
                             description="FGVC-Aircraft, 100 variants (CoOp: fgvc_aircraft/images_variant_*.txt)"))

COOP_DATASETS = ("imagenet", "caltech101", "oxford-pets", "stanford-cars", "flowers102", "food101", "fgvc-aircraft",
                 "sun397", "dtd", "eurosat", "ucf101")  # the order of CoOp's tables
