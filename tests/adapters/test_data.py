"""Default validation split and bad labelled input: one-line `DataError`s."""

from __future__ import annotations

import shutil

import pytest

from fsclip.adapters import fit, holdout_split
from fsclip.data import LabeledImages, load_image_folder, sample_shots
from fsclip.errors import DataError


def test_holdout_with_shots_keeps_the_sample_shots_images(shapes_task):
    train, val = holdout_split(shapes_task.pool, shots=4, seed=5)
    assert train == sample_shots(shapes_task.pool, 4, seed=5)
    assert set(val.counts().values()) == {4}  # min(k, 4)
    assert not set(train.paths) & set(val.paths)
    _, val1 = holdout_split(shapes_task.pool, shots=1, seed=5)
    assert set(val1.counts().values()) == {1}


def test_holdout_without_shots_splits_min_k_over_2_capped_at_4(shapes_task):
    train, val = holdout_split(shapes_task.pool, seed=0)
    assert set(val.counts().values()) == {4} and set(train.counts().values()) == {12}
    tiny = sample_shots(shapes_task.pool, 3, seed=0)
    train, val = holdout_split(tiny, seed=0)
    assert set(val.counts().values()) == {1} and set(train.counts().values()) == {2}


def test_one_image_class_without_validation_folder_is_an_error(shapes_task):
    one = sample_shots(shapes_task.pool, 1, seed=0)
    with pytest.raises(DataError, match=r"1 image\(s\).*needs 2.*--val"):
        holdout_split(one)
    with pytest.raises(DataError, match="--shots 16 plus a validation split of 4 per class needs 20"):
        holdout_split(shapes_task.pool, shots=16)


def test_validation_classes_must_match(shapes_task, tiny_openclip):
    val = shapes_task.val
    other = LabeledImages(val.paths, val.targets, tuple(reversed(val.classes)))
    with pytest.raises(DataError, match="validation classes differ from training"):
        fit(tiny_openclip, shapes_task.pool, "linear-probe", val=other)


def test_empty_class_and_single_class_are_errors(shapes_task, tiny_openclip):
    empty = LabeledImages(shapes_task.pool.paths, shapes_task.pool.targets, (*shapes_task.pool.classes, "blob"))
    with pytest.raises(DataError, match="no images: blob"):
        fit(tiny_openclip, empty, "linear-probe", val=shapes_task.val)
    one = LabeledImages(shapes_task.pool.paths[:3], (0, 0, 0), ("circle",))
    with pytest.raises(DataError, match="at least 2"):
        fit(tiny_openclip, one, "linear-probe")


@pytest.mark.parametrize("method", ["linear-probe", "lora"])
def test_unreadable_training_file_is_named(method, small_task, tiny_openclip, tmp_path):
    root = tmp_path / "train"
    shutil.copytree(small_task.root / "train", root)
    bad = root / "ring" / "broken.png"
    bad.write_bytes(b"not a png")
    data = load_image_folder(root)
    with pytest.raises(DataError) as err:
        fit(tiny_openclip, data, method, val=small_task.val, **({"iters": 1} if method == "lora" else {}))
    assert "broken.png" in str(err.value) and "\n" not in str(err.value)
