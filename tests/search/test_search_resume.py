"""kill -9 resume: a build killed mid-way and restarted with the same command equals an uninterrupted build.

The child is the real `fsclip index build` in its own process. To kill it at a known point (rather than
racing a fast build) it runs with a pause hook: after N rows written inside an open transaction, when
everything is staged but nothing published, or after a merge wrote the new base FAISS file but before
it is recorded. The parent then sends SIGKILL from outside, as a user or the OOM killer would.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from searchutil import render_photos

from fsclip.cli import main
from fsclip.search import ImageIndex

CHILD = textwrap.dedent("""
    import os, sys, time
    import fsclip.search.faiss_index as fi
    import fsclip.search.update as update

    def pause():
        print("PAUSED", flush=True)
        time.sleep(600)

    kind, _, n = os.environ["FSCLIP_TEST_KILL_AT"].partition(":")
    if kind == "put":  # inside an open transaction: this batch is half written
        real_put, calls = update._put, [0]
        def put(*a, **kw):
            real_put(*a, **kw)
            calls[0] += 1
            if calls[0] == int(n):
                pause()
        update._put = put
    elif kind == "publish":  # everything embedded and committed, the generation not yet published
        def publish(*a, **kw):
            pause()
        update._publish = publish
    else:  # merge: the new base FAISS file is on disk, not yet recorded as the base
        real_write = fi.write_index
        def write(*a, **kw):
            real_write(*a, **kw)
            pause()
        fi.write_index = write

    from fsclip.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _kill_at(tmp_path, argv: list[str], where: str) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "FSCLIP_TEST_KILL_AT": where, "OMP_NUM_THREADS": "1"}  # tiny model: 1 thread is fastest
    proc = subprocess.Popen([sys.executable, str(script), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 180)
        line = proc.stdout.readline() if ready else ""
        assert line == "PAUSED\n", f"child did not reach the kill point: {line!r} {proc.stderr.read() if not ready else ''}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _state(index: ImageIndex) -> dict[str, np.ndarray]:
    ids, vecs = index.vectors()
    con = sqlite3.connect(index.path / "meta.sqlite")
    rows = con.execute("SELECT id, path FROM files WHERE removed_gen IS NULL").fetchall()
    dupes = con.execute("SELECT count(*) - count(DISTINCT path) FROM files WHERE removed_gen IS NULL").fetchone()[0]
    con.close()
    assert dupes == 0 and len(rows) == len(ids) == len(index), "duplicate or unpublished entries"
    path_of = {i: os.fsdecode(p) for i, p in rows}  # paths are stored as bytes
    return {path_of[int(i)]: v for i, v in zip(ids, vecs)}


def _assert_same(resumed: ImageIndex, reference: ImageIndex) -> None:
    a, b = _state(resumed), _state(reference)
    assert sorted(a) == sorted(b)
    for path in a:
        np.testing.assert_allclose(a[path], b[path], atol=1e-5)
    q = reference.encode_text(["a red circle", "a blue star"])
    for ha, hb in zip(resumed.search_vectors(q, k=15), reference.search_vectors(q, k=15)):
        assert [h.path for h in ha] == [h.path for h in hb]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-photos")
    render_photos(root / "a", 100, seed=11)
    render_photos(root / "b", 100, seed=12, start=100)
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, photos, tiny_backend):
    """The same collection built in one uninterrupted go."""
    index = ImageIndex.create(tmp_path_factory.mktemp("reference") / "ref.idx", tiny_backend)
    index.add([photos], batch_size=8)
    return index


def _argv(photos, idx, tiny_openclip_dir) -> list[str]:
    return ["index", "build", str(photos), "--index", str(idx), "--model", str(tiny_openclip_dir),
            "--device", "cpu", "--batch-size", "8", "--format", "json", "-q"]


def test_build_killed_mid_batch_resumes_without_duplicates_or_loss(tmp_path, photos, tiny_openclip_dir,
                                                                    reference, capsys):
    idx = tmp_path / "killed.idx"
    argv = _argv(photos, idx, tiny_openclip_dir)
    _kill_at(tmp_path, argv, "put:60")  # 7 batches of 8 committed, the 8th half written

    # a reader opening the index now sees the last published state: empty, yet no error
    reader = ImageIndex.open(idx)
    assert len(reader) == 0 and reader.search_vectors(np.ones((1, reader.dim), np.float32), k=5) == [[]]
    assert reader.info()["pending"] == 56  # 7 committed batches; the open one rolled back

    assert main(argv) == 0  # the same command again
    report = json.loads(capsys.readouterr().out)
    assert (report["resumed"], report["embedded"], report["total"]) == (56, 144, 200)
    _assert_same(ImageIndex.open(idx), reference)
    assert reader.info()["images"] == 200  # the old reader moves to the new generation by itself


def test_update_killed_before_publish_resumes(tmp_path, photos, tiny_openclip_dir, tiny_backend, reference,
                                              capsys):
    idx = tmp_path / "update.idx"
    index = ImageIndex.create(idx, tiny_backend)
    index.add([photos / "a"], batch_size=8)
    argv = _argv(photos, idx, tiny_openclip_dir)
    _kill_at(tmp_path, argv, "publish")  # all 200 embedded and committed; not published

    reader = ImageIndex.open(idx)
    assert len(reader) == 100 and {h.path for h in reader.search(text="a circle", k=300)} == {
        str(p) for p in (photos / "a").iterdir()}
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["embedded"], report["resumed"], report["unchanged"], report["total"]) == (0, 100, 100, 200)
    resumed = ImageIndex.open(idx)
    _assert_same(resumed, reference)
    # the stale file of the killed run was replaced; only the published generation's file is left
    assert [p.name for p in idx.glob("*.faiss")] == [f"vectors-{resumed.generation}.faiss"]
    assert not list(idx.glob(".*.tmp"))


def test_update_killed_while_merging_resumes(tmp_path, photos, tiny_openclip_dir, tiny_backend, reference, capsys):
    """Killed after the merge wrote the new base file: the generation was already published (readers see
    all 200 through base + delta); the rerun finishes the merge and leaves one FAISS file."""
    idx = tmp_path / "merge.idx"
    index = ImageIndex.create(idx, tiny_backend)
    index.add([photos / "a"], batch_size=8)
    argv = _argv(photos, idx, tiny_openclip_dir)
    _kill_at(tmp_path, argv, "merge")

    reader = ImageIndex.open(idx)
    info = reader.info()
    assert info["images"] == 200 and info["index"]["delta"] == 100 and info["index"]["base_generation"] == 1
    _assert_same(reader, reference)
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["embedded"], report["unchanged"], report["total"]) == (0, 200, 200)
    resumed = ImageIndex.open(idx)
    assert resumed.info()["index"]["delta"] == 0 and resumed.info()["index"]["base_generation"] == 2
    _assert_same(resumed, reference)
    assert [p.name for p in idx.glob("*.faiss")] == ["vectors-2.faiss"]
    assert not list(idx.glob(".*.tmp"))
