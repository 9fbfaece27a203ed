"""`fsclip index ...`, `fsclip search`, `fsclip serve` end to end through `main(argv)`."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from fsclip.cli import main
from fsclip.shapes.world import BASE_SHAPES, COLOURS, write_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def photos(tmp_path):
    combos = [(c, s) for c in COLOURS for s in BASE_SHAPES]
    write_folder(tmp_path / "photos", {"one": combos, "two": combos}, per_class=10, seed=0, size=32)
    (tmp_path / "photos" / "one" / "broken.jpg").write_text("not an image")
    return tmp_path / "photos"


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _build(capsys, photos, idx, model, *extra):
    return _run(capsys, "index", "build", photos, "--index", idx, "--model", model, "--device", "cpu", "-q", *extra)


def test_build_search_update_remove_info(tmp_path, photos, tiny_openclip_dir, capsys):
    idx = tmp_path / "my.idx"
    rc, out, _ = _build(capsys, photos, idx, tiny_openclip_dir, "--format", "json")
    report = json.loads(out)
    assert rc == 0 and (report["embedded"], report["failed"], report["total"]) == (20, 1, 20)

    rc, out, _ = _run(capsys, "search", idx, "a red car at night", "-k", "5", "--format", "json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and len(rows) == 5 and set(rows[0]) == {"path", "score"}
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)

    query = photos / "two" / "0003.png"
    rc, out, _ = _run(capsys, "search", idx, "--image", query, "-k", "3", "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert table[0]["path"] == str(query) and float(table[0]["score"]) == pytest.approx(1.0, abs=1e-5)

    rc, out, _ = _run(capsys, "search", idx, "--query", "dog", "--query", "beach", "--minus", "people",
                      "--glob", "*/one/*", "-k", "50", "--format", "json")
    paths = [json.loads(line)["path"] for line in out.splitlines()]
    assert rc == 0 and len(paths) == 10 and all("/one/" in p for p in paths)
    rc, out, _ = _run(capsys, "search", idx, "x", "--prefix", photos / "two", "--min-width", "32", "-k", "50")
    assert rc == 0 and out.count(str(photos / "two")) == 10 and "/one/" not in out

    (photos / "one" / "0000.png").unlink()
    (photos / "two" / "0001.png").rename(photos / "two" / "renamed.png")
    rc, out, _ = _run(capsys, "index", "update", idx, "--device", "cpu", "-q", "--format", "json")
    report = json.loads(out)
    assert (report["embedded"], report["reused"], report["removed"], report["known_bad"]) == (0, 1, 2, 1)

    rc, out, _ = _run(capsys, "index", "remove", idx, photos / "two")
    assert rc == 0 and "removed 10 images" in out and "9 left" in out

    rc, out, _ = _run(capsys, "index", "info", idx)
    assert rc == 0 and "images:           9" in out and "broken.jpg: not an image" in out
    rc, out, _ = _run(capsys, "index", "info", idx, "--format", "json")
    info = json.loads(out)
    assert info["images"] == 9 and info["bad_files"] == 1 and info["errors"][0]["path"].endswith("broken.jpg")
    assert info["excluded"] == [str(photos / "two")] and info["index"]["kind"] == "flat"


def test_rerunning_build_is_an_incremental_update(tmp_path, photos, tiny_openclip_dir, capsys):
    idx = tmp_path / "my.idx"
    _build(capsys, photos, idx, tiny_openclip_dir)
    rc, out, _ = _build(capsys, photos, idx, tiny_openclip_dir, "--format", "json")
    report = json.loads(out)
    assert rc == 0 and (report["embedded"], report["unchanged"], report["total"]) == (0, 20, 20)
    rc, out, _ = _build(capsys, photos, idx, tiny_openclip_dir, "--overwrite", "--format", "json")
    assert rc == 0 and json.loads(out)["embedded"] == 20


def test_user_errors_are_one_line(tmp_path, photos, tiny_openclip_dir, tiny_hf_clip_dir, capsys):
    idx = tmp_path / "my.idx"
    _build(capsys, photos / "one", idx, tiny_openclip_dir)
    cases = [
        (["search", tmp_path / "nope.idx", "x"], "no index at"),
        (["search", idx], "nothing to search for"),
        (["search", idx, "x", "--model", tiny_hf_clip_dir, "--device", "cpu"], "cannot query it"),
        (["search", idx, "x", "--after", "last tuesday"], "invalid --after"),
        (["search", idx, "x", "-k", "0"], "k must be"),
        (["search", idx, "x", "--min-width", "-3"], "min_width"),
        (["search", idx, "--image", tmp_path / "missing.jpg"], "cannot use query image"),
        (["index", "build", photos, "--index", idx, "--model", tiny_hf_clip_dir, "--device", "cpu"],
         "cannot query it"),
        (["index", "build", tmp_path / "typo", "--index", tmp_path / "new.idx"], "no such file or folder"),
        (["index", "build", photos, "--index", photos / "one", "--overwrite", "--model", tiny_openclip_dir,
          "--device", "cpu"], "not an fsclip index; refusing to overwrite"),
        (["index", "info", photos], "not an fsclip index"),
    ]
    for argv, message in cases:
        rc, out, err = _run(capsys, *argv)
        assert rc == 2, (argv, err)
        lines = err.strip().splitlines()
        assert lines[-1].startswith("fsclip: error: ") and message in lines[-1], (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "new.idx").exists()  # a failed build leaves nothing behind


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_binds_localhost_by_default(tmp_path, photos, tiny_openclip_dir, capsys):
    httpx = pytest.importorskip("httpx")
    psutil = pytest.importorskip("psutil")
    idx = tmp_path / "my.idx"
    _build(capsys, photos / "one", idx, tiny_openclip_dir)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fsclip", "serve", str(idx), "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                info = httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=2).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert info["images"] == 10
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections() if c.status == "LISTEN"]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
        resp = httpx.get(f"http://127.0.0.1:{port}/api/image", params={"path": "/etc/passwd"})
        assert resp.status_code == 404 and resp.json()["error"].startswith("not in the index")
    finally:
        proc.terminate()
        proc.wait(10)
