"""`fsclip fit` / `eval report` outputs that could destroy data: checked first, refused with one line
(issue 9, items 5, 6, 15, 16, 20)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fsclip.cli import main
from fsclip.shapes import COLOURS, write_folder

NO_MODEL = "/no/such/model"  # every check here must come before the model loads


@pytest.fixture(scope="module")
def train(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile-fit")
    write_folder(root / "train", {s: [(c, s) for c in list(COLOURS)[:2]] for s in ("circle", "ring")}, 3, seed=0, size=32)
    return root / "train"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fit_refused(capsys, *argv: str) -> str:
    assert main(["fit", *argv, "--model", NO_MODEL, "--method", "tip-adapter", "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fsclip: error:"), err
    assert NO_MODEL not in err[0]
    return err[0]


def test_user_fits_into_their_own_folder_with_overwrite(train, tmp_path, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.txt").write_text("four years of work")
    msg = _fit_refused(capsys, str(train), "--out", str(mine), "--overwrite")
    assert "not written by fsclip" in msg
    assert (mine / "thesis.txt").read_text() == "four years of work"


def test_user_fits_with_out_equal_to_the_training_folder_and_overwrite(train, capsys):
    before = _snapshot(train)
    assert "is the training folder" in _fit_refused(capsys, str(train), "--out", str(train), "--overwrite")
    assert _snapshot(train) == before


def test_user_fits_with_out_inside_the_training_folder(train, capsys):
    msg = _fit_refused(capsys, str(train), "--out", str(train / "adapter"))
    assert "inside the training folder" in msg
    assert not (train / "adapter").exists()


def test_user_fits_with_out_containing_the_training_folder_and_overwrite(train, tmp_path, capsys):
    project = tmp_path / "project"
    shutil.copytree(train, project / "train")
    (project / "adapter_config.json").write_text(json.dumps({"method": "tip-adapter", "base_model": {}}))
    msg = _fit_refused(capsys, str(project / "train"), "--out", str(project), "--overwrite")
    assert "contains the training folder" in msg and (project / "train").is_dir()


def test_user_fits_with_out_dot(train, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("keep")
    assert "already exists" in _fit_refused(capsys, str(train), "--out", ".")
    assert "not written by fsclip" in _fit_refused(capsys, str(train), "--out", ".", "--overwrite")
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_user_fits_with_out_an_existing_file_and_overwrite(train, tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"precious")
    assert "is not a folder" in _fit_refused(capsys, str(train), "--out", str(target), "--overwrite")
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]  # no stray .model.bin.old


@pytest.mark.parametrize("merge", ["same", "inside"])
def test_user_fits_lora_with_merge_equal_to_or_inside_out(train, tmp_path, capsys, merge):
    out = tmp_path / "lora"
    target = out if merge == "same" else out / "merged"
    assert main(["fit", str(train), "--method", "lora", "--out", str(out), "--merge", str(target),
                 "--model", NO_MODEL, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--out and --merge" in err and NO_MODEL not in err
    assert not out.exists()


def test_user_fits_with_merge_into_their_own_folder_with_overwrite(train, tmp_path, capsys):
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "weights.pt").write_bytes(b"x")
    assert main(["fit", str(train), "--method", "lora", "--out", str(tmp_path / "a"), "--merge", str(mine),
                 "--overwrite", "--model", NO_MODEL, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--merge" in err and "not written by fsclip" in err
    assert (mine / "weights.pt").exists()


def test_user_fits_with_val_equal_to_train(train, tmp_path, capsys):
    msg = _fit_refused(capsys, str(train), "--val", str(train), "--out", str(tmp_path / "a"))
    assert "validation image(s) are also training images" in msg


def test_user_fits_with_val_a_copy_of_train(train, tmp_path, capsys):
    shutil.copytree(train, tmp_path / "val")
    msg = _fit_refused(capsys, str(train), "--val", str(tmp_path / "val"), "--out", str(tmp_path / "a"))
    assert "6 validation image(s) are also training images" in msg


def _report_refused(capsys, *argv: str) -> str:
    assert main(["eval", "report", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fsclip: error:"), err
    return err[0]


RESULT = Path(__file__).resolve().parents[2] / "eval" / "results" / "shapes" / "runs"


@pytest.fixture
def results(tmp_path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    shutil.copy(next(RESULT.glob("zeroshot__*.json")), folder)
    return folder


def test_user_writes_a_report_over_an_existing_file(results, tmp_path, capsys):
    target = tmp_path / "report.txt"
    target.write_text("mine")
    assert "is not a folder" in _report_refused(capsys, str(results), "--out", str(target), "--no-plots")
    assert target.read_text() == "mine"


def test_user_writes_a_report_into_the_results_folder(results, capsys):
    assert "is the results folder" in _report_refused(capsys, str(results), "--out", str(results), "--no-plots")
    assert [p.name for p in results.iterdir()] == [next(RESULT.glob("zeroshot__*.json")).name]


def test_user_writes_a_report_into_their_own_folder(results, tmp_path, capsys):
    mine = tmp_path / "docs"
    mine.mkdir()
    (mine / "results.csv").write_text("my,own,table\n")
    assert "did not write" in _report_refused(capsys, str(results), "--out", str(mine), "--no-plots")
    assert (mine / "results.csv").read_text() == "my,own,table\n"
