"""`fsclip classify` / `predict` inputs a careless or hostile user gives: odd files, odd names, odd folders,
and a reader that goes away (issue 9, items 9, 15, 19, 23)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fsclip.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), colour).save(path)
    return path


def _classify(capsys, model: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["classify", *argv, "--model", str(model), "--labels", "red,blue", "--device", "cpu", "-q"])
    out, err = capsys.readouterr()
    return code, out, err


def test_user_classifies_a_fifo_and_is_told_it_is_not_a_regular_file(tmp_path, tiny_openclip_dir, capsys):
    os.mkfifo(tmp_path / "fifo.png")
    _png(tmp_path / "ok.png")
    code, out, _ = _classify(capsys, tiny_openclip_dir, str(tmp_path / "fifo.png"), str(tmp_path / "ok.png"),
                             "--format", "json")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert records[0]["error"] == "not a regular file (a named pipe)"


def test_user_lists_a_missing_file_between_two_images_and_gets_records_in_input_order(
        tmp_path, tiny_openclip_dir, capsys):
    a, b = _png(tmp_path / "b_first.png"), _png(tmp_path / "a_last.png")
    code, out, _ = _classify(capsys, tiny_openclip_dir, str(a), str(tmp_path / "gone.png"), str(b),
                             "--format", "json")
    paths = [json.loads(line)["path"] for line in out.splitlines()]
    assert code == 0
    assert paths == [str(a), str(tmp_path / "gone.png"), str(b)]


@pytest.fixture
def deep_folder(tmp_path) -> Path:
    """tmp_path/d/d/.../d (1100 levels), removed one level at a time afterwards: pytest's own recursive
    cleanup (shutil.rmtree) would hit the recursion limit on it."""
    levels = [tmp_path]
    for _ in range(1100):  # Path.mkdir(parents=True) recurses too
        levels.append(levels[-1] / "d")
        levels[-1].mkdir()
    yield levels[-1]
    for level in reversed(levels[1:]):
        for f in level.iterdir():
            if not f.is_dir():
                f.unlink()
        level.rmdir()


def test_user_classifies_a_folder_1100_levels_deep(tmp_path, deep_folder, tiny_openclip_dir, capsys):
    _png(deep_folder / "bottom.png")
    _png(tmp_path / "top.png")
    code, out, err = _classify(capsys, tiny_openclip_dir, str(tmp_path), "--format", "json")
    names = [Path(json.loads(line)["path"]).name for line in out.splitlines()]
    assert code == 0, err
    assert sorted(names) == ["bottom.png", "top.png"]


@pytest.fixture
def latin1_named(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    # a name written by an old latin-1 system: byte 0xe9 is not valid UTF-8
    _png(Path(os.fsdecode(bytes(folder) + b"/caf\xe9.png")))
    return folder


@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
def test_user_classifies_a_file_whose_name_is_not_utf8(latin1_named, tiny_openclip_dir, capsys, fmt):
    code, out, _ = _classify(capsys, tiny_openclip_dir, str(latin1_named), "--format", fmt)
    assert code == 0
    out.encode("utf-8")  # strict: a lone surrogate (the raw byte) would raise here
    shown = str(latin1_named / "caf\\xe9.png")
    if fmt == "json":
        assert json.loads(out)["path"] == shown
    elif fmt == "csv":
        assert {row["path"] for row in csv.DictReader(io.StringIO(out))} == {shown}
    else:
        assert shown in out


def test_user_pipes_classify_into_head(tmp_path, tiny_openclip_dir):
    for i in range(200):
        _png(tmp_path / "imgs" / f"{i:03d}.png", (i, 255 - i, 0))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fsclip", "classify", str(tmp_path / "imgs"), "--model", str(tiny_openclip_dir),
         "--labels", "red,green", "--format", "json", "--batch-size", "1", "--device", "cpu", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    first = proc.stdout.readline()  # `| head -1`: read one line, then go away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=300)
    assert json.loads(first)["path"].endswith("000.png")
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert code == 141, err


def test_user_classifies_with_a_model_whose_weights_hold_nan(tmp_path, tiny_openclip_dir, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_openclip_dir, model)
    weights = model / "open_clip_model.safetensors"
    tensors = load_file(weights)
    tensors["text_projection"][0, 0] = float("nan")
    save_file(tensors, weights)
    code, out, err = _classify(capsys, model, str(_png(tmp_path / "a.png")), "--format", "json")
    assert code != 0 and "NaN" not in out
    assert "NaN or infinite scores" in err and "Traceback" not in err
