"""Dataset loaders against the on-disk layouts they promise to read (CoOp's DATASETS.md, HF, captions)."""

from __future__ import annotations

import json
import logging

import pytest

from fsclip.errors import DataError, UsageError
from fsclip.evaluation import COOP_DATASETS, few_shot_split, get_dataset, list_datasets, load_dataset
from fsclip.prompts_io import load_templates

# CoOp's layout, written down independently of the loaders: name -> (folder, image folder, split file)
SPLIT_FILE_LAYOUT = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford-pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford-cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "flowers102": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
RAW_CLASSES = ("class_a", "b_thing", "c")
COUNTS = {"train": 3, "val": 1, "test": 2}


def _write_split_layout(root, png, name):
    folder, images, split_file = SPLIT_FILE_LAYOUT[name]
    base = root / folder / images if images else root / folder
    split = {}
    for s, n in COUNTS.items():
        split[s] = []
        for label, cname in enumerate(RAW_CLASSES):
            for i in range(n):
                rel = f"{cname}/{s}_{i}.png"
                png(base / rel, seed=label * 10 + i)
                split[s].append([rel, label, cname])
    (root / folder / split_file).write_text(json.dumps(split))
    return root / folder / split_file


def _write_imagenet(root, png):
    folder = root / "imagenet"
    folder.mkdir(parents=True)
    (folder / "classnames.txt").write_text("n02 great white shark\nn01 goldfish\nn03 tiger shark\n")
    for split, n in (("train", 4), ("val", 2)):
        for w, wnid in enumerate(("n01", "n02", "n03")):
            for i in range(n):
                png(folder / "images" / split / wnid / f"{wnid}_{i}.JPEG", seed=w * 10 + i)


def _write_aircraft(root, png):
    folder = root / "fgvc_aircraft"
    folder.mkdir(parents=True)
    variants = ["707-320", "A300B4", "Cessna 172"]
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    n = 0
    for split, per in COUNTS.items():
        lines = []
        for v in variants:
            for _ in range(per):
                n += 1
                png(folder / "images" / f"{n:07d}.jpg", seed=n)
                lines.append(f"{n:07d} {v}")
        (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")


def test_every_coop_dataset_is_registered_with_its_templates():
    assert set(SPLIT_FILE_LAYOUT) | {"imagenet", "fgvc-aircraft"} == set(COOP_DATASETS)
    assert set(COOP_DATASETS) <= set(list_datasets("classification"))
    for name in COOP_DATASETS:
        spec = get_dataset(name)
        assert spec.templates == f"coop-{name}"
        assert load_templates(spec.templates)  # the template set ships


@pytest.mark.parametrize("name", sorted(SPLIT_FILE_LAYOUT))
def test_coop_split_file(tmp_path, png, name):
    _write_split_layout(tmp_path, png, name)
    data = load_dataset(name, tmp_path)
    assert data.classes == ("class a", "b thing", "c")  # CoOp reads `_` as a space in the prompt
    for split, n in COUNTS.items():
        part = data.split(split)
        assert len(part) == n * 3 and all(p.is_file() for p in part.paths)
        assert sorted(part.targets) == sorted([0, 1, 2] * n)
    assert "CoOp split" in data.source and data.templates == f"coop-{name}"
    # the dataset folder itself works as --root too
    assert load_dataset(name, tmp_path / SPLIT_FILE_LAYOUT[name][0]).classes == data.classes


def test_coop_imagenet_layout_and_validation_from_train(tmp_path, png):
    _write_imagenet(tmp_path, png)
    data = load_dataset("imagenet", tmp_path)
    assert data.classes == ("goldfish", "great white shark", "tiger shark")  # sorted wnids, CoOp's labels
    assert len(data.train) == 12 and len(data.test) == 6 and data.val is None
    train, val = few_shot_split(data, shots=2, seed=1)
    assert len(train) == 6 and len(val) == 6  # K = 2 shots and min(K, 4) = 2 validation images per class
    assert not set(train.paths) & set(val.paths)  # validation never overlaps the shots, nor the test set
    assert not set(val.paths) & set(data.test.paths)


def test_coop_aircraft_variant_lists(tmp_path, png):
    _write_aircraft(tmp_path, png)
    data = load_dataset("fgvc-aircraft", tmp_path)
    assert data.classes == ("707-320", "A300B4", "Cessna 172")
    assert [len(data.split(s)) for s in ("train", "val", "test")] == [9, 3, 6]


def test_few_shot_split_is_seeded_and_follows_coop(tmp_path, png):
    _write_split_layout(tmp_path, png, "dtd")
    data = load_dataset("dtd", tmp_path)
    a, va = few_shot_split(data, shots=2, seed=1)
    b, _ = few_shot_split(data, shots=2, seed=1)
    assert a.paths == b.paths and len(a) == 6
    assert set(va.paths) == set(data.val.paths)  # min(K, 4) = 2 per class wanted, 1 there: all of it (CoOp)
    c, _ = few_shot_split(data, shots=2, seed=2)
    assert c.paths != a.paths
    with pytest.raises(DataError, match="fewer than"):
        few_shot_split(data, shots=4, seed=1)  # 3 training images per class


def test_missing_split_file(tmp_path, png, caplog):
    for c in range(3):
        for i in range(5):
            png(tmp_path / "dtd" / "images" / f"cls_{c}" / f"{i}.png", seed=i)
    with caplog.at_level(logging.WARNING):
        data = load_dataset("dtd", tmp_path)  # one folder per class: CoOp's 50/20/30 split
    assert "not comparable" in caplog.text
    parts = [set(data.split(s).paths) for s in ("train", "val", "test")]
    assert all(parts) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sum(map(len, parts)) == 15 and data.classes == ("cls 0", "cls 1", "cls 2")
    (tmp_path / "oxford_pets").mkdir()
    with pytest.raises(DataError, match="split_zhou_OxfordPets.json not found"):
        load_dataset("oxford-pets", tmp_path)


def test_broken_split_files(tmp_path, png):
    file = _write_split_layout(tmp_path, png, "eurosat")
    split = json.loads(file.read_text())
    split["test"].append(["class_a/gone.png", 0, "class_a"])
    file.write_text(json.dumps(split))
    with pytest.raises(DataError, match=r"1 of 7 image\(s\) not found"):
        load_dataset("eurosat", tmp_path)
    split["test"][-1] = ["class_a/test_0.png", 0, "other"]
    file.write_text(json.dumps(split))
    with pytest.raises(DataError, match="label 0 is both"):
        load_dataset("eurosat", tmp_path)
    file.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_dataset("eurosat", tmp_path)


def test_unknown_or_missing_dataset(tmp_path):
    with pytest.raises(UsageError, match="unknown dataset 'dtdd'; choose one of: caltech101, .*dtd"):
        load_dataset("dtdd", tmp_path)
    with pytest.raises(UsageError, match="'flickr30k' is for retrieval, not classification"):
        load_dataset("flickr30k", tmp_path, "classification")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("dtd", tmp_path / "nowhere")


def test_imagefolder_splits_and_metadata(tmp_path, png):
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for c in ("cat", "dog", "sea_lion"):
            for i in range(n):
                png(tmp_path / split / c / f"{i}.png", seed=i)
    (tmp_path / "fsclip-dataset.json").write_text(json.dumps({"templates": "generic", "groups": {"rare": ["sea lion"]}}))
    data = load_dataset("imagefolder", tmp_path)
    assert data.classes == ("cat", "dog", "sea lion") and data.templates == "generic"
    assert dict(data.groups) == {"rare": ("sea lion",)}
    assert [len(data.split(s)) for s in ("train", "val", "test")] == [9, 3, 6]
    (tmp_path / "fsclip-dataset.json").write_text(json.dumps({"groups": {"rare": ["walrus"]}}))
    with pytest.raises(DataError, match="unknown classes"):
        load_dataset("imagefolder", tmp_path)
    (tmp_path / "val" / "dog" / "0.png").unlink()
    (tmp_path / "val" / "dog").rmdir()
    (tmp_path / "fsclip-dataset.json").unlink()
    with pytest.raises(DataError, match="differ from training: missing \\['dog'\\]"):
        load_dataset("imagefolder", tmp_path)


def test_hf_saved_dataset_and_imagefolder_builder(tmp_path, png):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    images = [Image.open(png(tmp_path / "src" / f"{i}.png", seed=i)).convert("RGB") for i in range(12)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["red_fox", "owl"])})
    rows = lambda sl: {"img": images[sl], "label": [i % 2 for i in range(len(images[sl]))]}  # noqa: E731
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(slice(0, 8)), features=features),
                               "test": datasets.Dataset.from_dict(rows(slice(8, 12)), features=features)})
    dd.save_to_disk(str(tmp_path / "saved"))
    data = load_dataset("hf", tmp_path / "saved")
    assert data.classes == ("red fox", "owl") and len(data.train) == 8 and len(data.test) == 4 and data.val is None
    assert all(p.is_file() for p in data.test.paths)  # embedded images were written out once
    again = load_dataset("hf", tmp_path / "saved")
    assert again.test.paths == data.test.paths
    assert Image.open(data.test.paths[0]).tobytes() == images[8].tobytes()

    for split, n in (("train", 2), ("test", 1)):
        for c in ("a", "b"):
            for i in range(n):
                png(tmp_path / "folder" / split / c / f"{i}.png", seed=i)
    data = load_dataset("hf", tmp_path / "folder")  # the `imagefolder` builder: files are used in place
    assert data.classes == ("a", "b") and len(data.train) == 4
    assert all(str(p).startswith(str(tmp_path / "folder")) for p in data.train.paths)


CAPTIONS = {"a.png": ["a red circle.", "a circle that is red."], "b.png": ["a blue star."]}


def _caption_files(folder):
    karpathy = {"images": [{"filename": f, "split": "test", "sentences": [{"raw": c} for c in caps]}
                           for f, caps in CAPTIONS.items()] + [{"filename": "x.png", "split": "train",
                                                                "sentences": [{"raw": "never read"}]}]}
    coco = {"images": [{"id": i, "file_name": f} for i, f in enumerate(CAPTIONS)],
            "annotations": [{"image_id": i, "caption": c} for i, caps in enumerate(CAPTIONS.values()) for c in caps]}
    token = "".join(f"{f}#{n}\t{c}\n" for f, caps in CAPTIONS.items() for n, c in enumerate(caps))
    csv_text = "image,caption\n" + "".join(f'{f},"{c}"\n' for f, caps in CAPTIONS.items() for c in caps)
    return {"dataset_x.json": json.dumps(karpathy), "captions.json": json.dumps(coco), "captions.token": token,
            "captions.csv": csv_text}


@pytest.mark.parametrize("file", ["dataset_x.json", "captions.json", "captions.token", "captions.csv"])
def test_caption_formats(tmp_path, png, file):
    for n, f in enumerate(CAPTIONS):
        png(tmp_path / "images" / f, seed=n)
    (tmp_path / file).write_text(_caption_files(tmp_path)[file])
    data = load_dataset("captions", tmp_path)
    assert [p.name for p in data.paths] == list(CAPTIONS)
    assert [list(c) for c in data.captions] == list(CAPTIONS.values())
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(DataError, match="1 of 2 images not found"):
        load_dataset("captions", tmp_path)
