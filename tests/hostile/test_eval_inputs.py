"""`fsclip eval` on damaged split files, empty splits and hand-edited result files (issue 9, item 16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from fsclip.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUNS = Path(__file__).resolve().parents[2] / "eval" / "results" / "shapes" / "runs"


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fsclip: error:"), err
    return err[0]


def _dtd(root: Path, test_entries) -> Path:
    """A CoOp-layout `dtd` folder with two classes and the given test entries in its split file."""
    images = root / "dtd" / "images"
    entries = {"train": [], "val": []}
    for label, name in enumerate(("banded", "dotted")):
        (images / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (80 * label, 60 * i, 90)).save(images / name / f"{i}.png")
        entries["train"].append([f"{name}/0.png", label, name])
        entries["val"].append([f"{name}/1.png", label, name])
    split = {**entries, "test": test_entries}
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    return root


def test_user_evaluates_with_a_split_file_whose_label_is_abc(tmp_path, capsys):
    root = _dtd(tmp_path / "data", [["banded/0.png", "abc", "banded"]])
    assert main(["eval", "zeroshot", "--dataset", "dtd", "--root", str(root), "--out", str(tmp_path / "out"),
                 "--model", "/no/such/model", "-q"]) == 2
    msg = _one_error(capsys)
    assert "split_zhou_DescribableTextures.json" in msg and "integer label" in msg


def test_user_evaluates_a_dataset_with_an_empty_test_split(tmp_path, capsys):
    root = _dtd(tmp_path / "data", [])
    assert main(["eval", "zeroshot", "--dataset", "dtd", "--root", str(root), "--out", str(tmp_path / "out"),
                 "--model", "shapes", "--device", "cpu", "-q"]) == 2
    assert "empty test split" in _one_error(capsys)
    assert not list(tmp_path.glob("out/*.json"))  # no result file claiming a 0% accuracy


def _edited_result(tmp_path: Path, edit) -> Path:
    source = next(RUNS.glob("fewshot__*.json"))
    record = json.loads(source.read_text())
    edit(record)
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / source.name).write_text(json.dumps(record))
    return folder / source.name


def _set(path: str, value):
    def edit(record):
        *parents, key = path.split(".")
        part = record
        for p in parents:
            part = part[p]
        if value is KeyError:
            del part[key]
        else:
            part[key] = value
    return edit


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [("metrics.top1", "high", "metrics.top1"), ("run.dataset", KeyError, "run.dataset"),
     ("model", ["shapes"], "model"), ("metrics.calibration", {"count": "x"}, "metrics.calibration.count"),
     ("timing", {}, "timing.fit_seconds"), ("run.shots", "16", "run.shots"), ("schema", "1", "schema")],
    ids=lambda v: str(v),
)
def test_user_reports_on_a_hand_edited_result_file(tmp_path, capsys, path, value, named):
    file = _edited_result(tmp_path, _set(path, value))
    assert main(["eval", "report", str(file)]) == 2
    msg = _one_error(capsys)
    assert file.name in msg and named in msg


def test_user_reports_on_a_result_with_an_unknown_task(tmp_path, capsys):
    file = _edited_result(tmp_path, _set("run.task", "segmentation"))
    assert main(["eval", "report", str(file.parent)]) == 2
    msg = _one_error(capsys)
    assert "unknown task 'segmentation'" in msg and file.name in msg


def test_user_evaluates_with_out_an_existing_file(tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("my notes")
    assert main(["eval", "zeroshot", "--dataset", "shapes-novel", "--root", str(tmp_path), "--out", str(target),
                 "--model", "/no/such/model", "-q"]) == 2
    assert "is not a folder" in _one_error(capsys)
    assert target.read_text() == "my notes"
