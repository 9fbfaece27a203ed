"""Hostile `index build` / `index update` inputs: odd files, odd names, odd flags, odd folders."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
from _search_util import cli, cli_without_root_bypass, one_error_line, photos, tiny_backend  # noqa: F401
from PIL import Image

from fsclip.search import ImageIndex

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(capsys, model, idx, *paths, extra=()):
    return cli(capsys, "index", "build", *paths, "--index", idx, "--model", model, "--device", "cpu", "-q",
               "--format", "json", *extra)


def test_index_build_and_update_with_a_latin1_file_name(tmp_path, tiny_openclip_dir, capsys):
    """A name that is not UTF-8 (`caf\\xe9.png`) is indexed, found, shown escaped, and stays valid JSON."""
    folder = tmp_path / "photos"
    photos(folder, 3)
    odd = os.path.join(os.fsencode(folder), b"caf\xe9.png")
    shutil.copy(os.fsencode(folder / "img0000.png"), odd)
    idx = tmp_path / "p.idx"
    rc, out, err = _build(capsys, tiny_openclip_dir, idx, folder)
    assert rc == 0, err
    assert json.loads(out)["total"] == 4
    rc, out, err = cli(capsys, "index", "update", idx, "--device", "cpu", "-q", "--format", "json")
    assert rc == 0 and json.loads(out)["unchanged"] == 4, err

    rc, out, err = cli(capsys, "search", idx, "--image", os.fsdecode(odd), "-k", "4", "--format", "json")
    assert rc == 0, err
    out.encode("utf-8")  # strict: a raw surrogate (an invalid UTF-8 byte on stdout) would raise here
    paths = [json.loads(line)["path"] for line in out.splitlines()]
    assert f"{folder}/caf\\xe9.png" in paths
    with ImageIndex.open(idx) as index:
        assert index.lookup(os.fsdecode(odd)) is not None  # stored losslessly: the real name finds it
    rc, out, _ = cli(capsys, "index", "info", idx, "--format", "json")
    assert rc == 0 and json.loads(out)["images"] == 4


def test_index_build_ann_threshold_1_with_5_images(tmp_path, tiny_openclip_dir, capsys):
    """Too few images to train IVF: exact search with a warning, nothing left pending, updates work."""
    photos(tmp_path / "photos", 5)
    idx = tmp_path / "p.idx"
    rc, out, err = cli(capsys, "index", "build", tmp_path / "photos", "--index", idx, "--model", tiny_openclip_dir,
                       "--device", "cpu", "--ann-threshold", "1", "--format", "json")
    assert rc == 0, err
    report = json.loads(out)
    assert (report["total"], report["kind"]) == (5, "flat")
    assert "needs at least 256 to train" in err
    photos(tmp_path / "more", 2, seed=1)
    rc, out, err = cli(capsys, "index", "build", tmp_path / "more", "--index", idx, "--device", "cpu", "-q",
                       "--format", "json")
    assert rc == 0 and json.loads(out)["total"] == 7, err
    with ImageIndex.open(idx) as index:
        assert index.info()["pending"] == 0


def test_index_build_of_a_fifo_named_like_an_image(tmp_path, tiny_openclip_dir, capsys):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    rc, _, err = _build(capsys, tiny_openclip_dir, tmp_path / "f.idx", fifo)
    assert rc == 2
    one_error_line(err, "is a FIFO, not an image file or a folder")
    assert not (tmp_path / "f.idx").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "argument --batch-size: must be >= 1"),
    ("--batch-size", "-1", "argument --batch-size: must be >= 1"),
    ("--workers", "-1", "argument --workers: must be >= 1"),
], ids=["batch-size-0", "batch-size-negative", "workers-negative"])
def test_index_update_with_a_nonsense_flag(tmp_path, tiny_openclip_dir, capsys, flag, value, message):
    """Refused before the model loads, and no image is left pending by a run that died halfway."""
    photos(tmp_path / "photos", 3)
    idx = tmp_path / "p.idx"
    _build(capsys, tiny_openclip_dir, idx, tmp_path / "photos")
    photos(tmp_path / "photos", 5, seed=2)  # two new files, three changed: work to do
    rc, _, err = cli(capsys, "index", "update", idx, "--device", "cpu", "-q", flag, value)
    assert rc == 2
    one_error_line(err, message)
    with ImageIndex.open(idx) as index:
        assert index.info()["pending"] == 0


def test_index_build_of_a_20gb_sparse_jpg(tmp_path, tiny_openclip_dir, capsys):
    """A huge file that is no image is refused from its header: a few KB read, not 20 GB hashed."""
    if not os.path.exists("/proc/self/io"):
        pytest.skip("counts bytes read through /proc/self/io (Linux)")
    folder = tmp_path / "photos"
    photos(folder, 2)
    with open(folder / "big.jpg", "wb") as f:
        f.truncate(20 * 2**30)  # sparse: no disk space used

    def bytes_read() -> int:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])

    before = bytes_read()
    rc, out, err = _build(capsys, tiny_openclip_dir, tmp_path / "p.idx", folder)
    read = bytes_read() - before
    assert rc == 0, err
    report = json.loads(out)
    assert (report["total"], report["failed"]) == (2, 1)
    assert read < 2**30, f"read {read / 2**30:.1f} GiB to reject big.jpg"
    with ImageIndex.open(tmp_path / "p.idx") as index:
        assert {e["path"].rsplit("/", 1)[1]: e["reason"] for e in index.errors()} == {
            "big.jpg": "not an image (unknown or corrupt format)"}


def test_index_build_of_phone_photos_heic_avif_jfif(tmp_path, tiny_backend):  # noqa: F811
    """Phone formats are read where a decoder is installed, and a bad one is a recorded error, never ignored."""
    from PIL import features

    folder = tmp_path / "photos"
    src = Image.open(photos(tmp_path / "src", 1)[0]).convert("RGB")
    folder.mkdir()
    src.save(folder / "c.jfif", format="JPEG")
    expected = {"c.jfif"}
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        src.save(folder / "a.heic", format="HEIF")
        expected.add("a.heic")
    except ImportError:
        pass
    if features.check("avif"):
        src.save(folder / "b.avif", format="AVIF")
        expected.add("b.avif")
    (folder / "broken.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    index = ImageIndex.create(tmp_path / "p.idx", tiny_backend)
    report = index.add([folder])
    assert (report.embedded + report.reused, report.failed) == (len(expected), 1)
    assert {os.path.basename(h.path) for h in index.search(text="x", k=10)} == expected
    errors = {os.path.basename(e["path"]): e["reason"] for e in index.errors()}
    assert set(errors) == {"broken.heic"}


@pytest.mark.skipif(sys.platform != "linux", reason="drops Linux capabilities to make mode 000 bind root too")
def test_index_update_with_a_chmod_000_subfolder(tmp_path, tiny_openclip_dir, capsys):
    """An unreadable subfolder keeps its entries (like a missing root) and is reported on stderr and by info."""
    root = tmp_path / "photos"
    photos(root / "a", 3)
    photos(root / "b", 4, seed=1)
    idx = tmp_path / "p.idx"
    rc, out, err = _build(capsys, tiny_openclip_dir, idx, root)
    assert rc == 0 and json.loads(out)["total"] == 7, err
    (root / "b").chmod(0)
    try:
        proc = cli_without_root_bypass("index", "update", idx, "--device", "cpu", "--format", "json")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert (report["total"], report["removed"]) == (7, 0)
        assert report["unreadable"] == [{"path": str(root / "b"), "reason": "Permission denied"}]
        assert f"cannot read folder {root / 'b'} (Permission denied)" in proc.stderr
        proc = cli_without_root_bypass("index", "info", idx)
        assert proc.returncode == 0 and f"{root / 'b'}: cannot read folder: Permission denied" in proc.stdout
    finally:
        (root / "b").chmod(0o755)
    rc, out, _ = cli(capsys, "index", "update", idx, "--device", "cpu", "-q", "--format", "json")
    assert json.loads(out)["unreadable"] == []
    with ImageIndex.open(idx) as index:
        assert len(index) == 7 and index.errors() == []  # readable again: the record goes away


@pytest.mark.skipif(sys.platform != "linux", reason="drops Linux capabilities to make mode 000 bind root too")
def test_index_build_of_a_folder_with_an_unreadable_subfolder(tmp_path, tiny_openclip_dir):
    root = tmp_path / "photos"
    photos(root / "a", 2)
    photos(root / "locked", 2, seed=1)
    (root / "locked").chmod(0)
    try:
        proc = cli_without_root_bypass("index", "build", root, "--index", tmp_path / "p.idx", "--model",
                                       tiny_openclip_dir, "--device", "cpu")
    finally:
        (root / "locked").chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    assert "2 images searchable" in proc.stdout
    assert f"unreadable folder kept as is: {root / 'locked'} (Permission denied)" in proc.stdout
    assert f"cannot read folder {root / 'locked'}" in proc.stderr
