"""Label and template files a user really has, and a damaged label cache (issue 9, items 13, 15, 21, 23)."""

from __future__ import annotations

import codecs
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch
from PIL import Image

from fsclip.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NO_MODEL = "/no/such/model"  # usage errors must come before the model loads


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (24, 24), (220, 20, 20)).save(path)
    return path


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fsclip: error:"), err
    return err[0]


def _labels_seen(capsys) -> set[str]:
    return {p["label"] for line in capsys.readouterr().out.splitlines() for p in json.loads(line)["predictions"]}


@pytest.mark.parametrize(("encoding", "bom"), [("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE),
                                               ("utf-8", codecs.BOM_UTF8)], ids=["utf-16-le", "utf-16-be", "utf-8-bom"])
def test_user_saves_labels_as_unicode_in_a_windows_editor(tmp_path, image, tiny_openclip_dir, capsys, encoding, bom):
    labels = tmp_path / "labels.txt"
    labels.write_bytes(bom + "red circle\r\nblue star\r\ngrün\r\n".encode(encoding))
    assert main(["classify", str(image), "--labels-file", str(labels), "--model", str(tiny_openclip_dir),
                 "--format", "json", "--device", "cpu", "-q"]) == 0
    assert _labels_seen(capsys) == {"red circle", "blue star", "grün"}


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"caf\xe9\nth\xe9\n", "is not UTF-8 text (byte 0xe9"),  # latin-1
     (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 text"),  # an image passed by mistake
     (b"cat\x00\ndog\x00\n", "is a binary file")],
    ids=["latin-1", "png", "nul-bytes"],
)
def test_user_passes_a_labels_file_that_is_not_utf8_text(tmp_path, image, capsys, content, message):
    labels = tmp_path / "labels.txt"
    labels.write_bytes(content)
    assert main(["classify", str(image), "--labels-file", str(labels), "--model", NO_MODEL]) == 2
    assert message in _error(capsys)


def test_user_passes_a_folder_as_labels_file(tmp_path, image, capsys):
    assert main(["classify", str(image), "--labels-file", str(tmp_path), "--model", NO_MODEL]) == 2
    assert "is a folder, not a file" in _error(capsys)


@pytest.mark.parametrize("kind", ["folder", "binary"])
def test_user_passes_a_folder_or_binary_file_as_templates(tmp_path, image, capsys, kind):
    templates = tmp_path / "templates.json"
    if kind == "folder":
        templates.mkdir()
    else:
        templates.write_bytes(bytes(range(256)))
    assert main(["classify", str(image), "--labels", "a,b", "--templates", str(templates), "--model", NO_MODEL]) == 2
    assert ("is a folder" if kind == "folder" else "not UTF-8 text") in _error(capsys)


@pytest.mark.parametrize("labels", ["Cat,cat", "sea lion,Sea  Lion"])
def test_user_gives_labels_that_differ_only_in_case_or_spacing(image, capsys, labels):
    assert main(["classify", str(image), "--labels", labels, "--model", NO_MODEL]) == 2
    assert "duplicate labels" in _error(capsys)


def test_user_gives_both_template_and_templates(image, capsys):
    assert main(["classify", str(image), "--labels", "a,b", "--templates", "generic", "--template", "a {}.",
                 "--model", NO_MODEL]) == 2
    line = _error(capsys)
    assert "--template" in line and "--templates" in line


def _label_cache(cache: Path) -> Path:
    (file,) = (cache / "text").glob("*.safetensors")
    return file


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "nan"])
def test_user_runs_classify_after_the_label_cache_was_damaged(tmp_path, tiny_openclip_dir, monkeypatch, damage):
    from safetensors.torch import load_file, save_file

    from fsclip.backends import load_model
    from fsclip.zeroshot import ZeroShotClassifier

    monkeypatch.setenv("FSCLIP_CACHE", str(tmp_path / "cache"))
    backend = load_model(str(tiny_openclip_dir), device="cpu")
    fresh = ZeroShotClassifier(backend, ["red", "blue", "green"], "generic").weights
    file = _label_cache(tmp_path / "cache")
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[:50])
    else:
        w = load_file(file)["weights"]
        w[1] = 0.0 if damage == "zeroed" else float("nan")
        save_file({"weights": w}, file)
    again = ZeroShotClassifier(backend, ["red", "blue", "green"], "generic").weights
    torch.testing.assert_close(again, fresh)
    torch.testing.assert_close(load_file(file)["weights"], fresh)  # and the cache is repaired


def test_user_classifies_with_many_labels_in_a_terminal_and_sees_text_progress(tmp_path, image, tiny_openclip_dir):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"thing {i}" for i in range(40)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1",
           "FSCLIP_CACHE": str(tmp_path / "cache")}
    leader, follower = pty.openpty()  # stderr is a terminal, as for a user at a shell
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm draws nothing at 0 columns
    proc = subprocess.Popen(
        [sys.executable, "-m", "fsclip", "classify", str(image), "--labels-file", str(labels),
         "--model", str(tiny_openclip_dir), "--templates", "imagenet80", "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=follower, env=env,
    )
    os.close(follower)
    err = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        err += chunk
    os.close(leader)
    assert proc.wait(timeout=600) == 0, err
    assert b"encoding labels" in err and b"/3200 [" in err, err[-2000:]
