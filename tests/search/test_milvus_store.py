"""What only the Milvus store has to prove: locations, approximate search recall, crash resume against
Milvus Lite killed with SIGKILL, and one process per Milvus Lite folder (runs on Milvus Lite; skipped
without it)."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from searchutil import model_record, render_photos, synthetic_embeddings, write_embeddings
from test_store_contract import MILVUS

from eval.bench_search import text_like
from fsclip.cli import main
from fsclip.errors import UsageError
from fsclip.search import ImageIndex
from fsclip.search import faiss_index as fi
from fsclip.search.stores import engine_for
from fsclip.search.stores.milvus import decode_path, encode_path, milvus_filter, parse_location

needs_milvus = pytest.mark.skipif(not MILVUS, reason="Milvus Lite is not installed: pip install 'fsclip[milvus]'")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_locations_choose_the_engine(tmp_path, monkeypatch):
    assert engine_for(str(tmp_path / "photos.idx")).engine == "faiss"
    assert engine_for(str(tmp_path / "photos.db")).engine == "milvus"
    assert engine_for("milvus://db.example.com:19530/photos").engine == "milvus"
    (tmp_path / "old.db").mkdir()  # a FAISS index that happens to be named *.db stays one
    (tmp_path / "old.db" / "meta.sqlite").touch()
    assert engine_for(str(tmp_path / "old.db")).engine == "faiss"

    monkeypatch.setenv("FSCLIP_DATA", str(tmp_path / "state"))
    loc = parse_location("milvus://db.example.com:19531/photos?db=team")
    assert (loc.uri, loc.collection, loc.db, loc.lite) == ("http://db.example.com:19531", "photos", "team", False)
    assert loc.catalog_dir == tmp_path / "state" / "milvus" / "db.example.com_19531" / "team" / "photos"
    assert parse_location("milvus+https://h/c").uri == "https://h:19530"
    lite = parse_location(str(tmp_path / "p.db"))
    assert lite.lite and lite.catalog_dir == tmp_path / "p.db" / "fsclip"
    for bad in ("milvus://host", "milvus://host:1/a/b", "milvus:///c", "mivlus://h/c"):
        if engine_for(bad).engine == "milvus":
            with pytest.raises(UsageError, match="invalid Milvus location"):
                parse_location(bad)


def test_paths_that_are_not_utf8_round_trip_and_filters_translate():
    for name in ["/p/café.png", "/p/a\\b.png", os.fsdecode(b"/p/caf\xe9.png"), os.fsdecode(b"/p/\\x41\xff.png")]:
        text, escaped = encode_path(name)
        text.encode("utf-8")  # what a VARCHAR takes
        assert decode_path(text, escaped) == name
        assert escaped == any(0xDC80 <= ord(c) <= 0xDCFF for c in name)  # only names that are not UTF-8
    from fsclip.search import Where

    expr, exact = milvus_filter(Where(path_glob='*/a"b/*.png', min_width=10), 3)
    assert exact and 'path like "%/a\\"b/%.png"' in expr and "width >= 10" in expr and "added_gen <= 3" in expr
    assert milvus_filter(Where(path_glob="*/img[0-4].png"), 1)[1] is False  # a class: checked after the search
    assert milvus_filter(Where(path_prefix="/data/my_photos/"), 1)[1] is False  # `_` is a LIKE wildcard


def test_an_unreachable_server_is_one_line(capsys):
    rc = main(["index", "info", "milvus://nohost"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("fsclip: error: invalid Milvus location") and err.count("\n") == 1


@needs_milvus
def test_ivf_recall_on_image_and_text_queries(tmp_path, tiny_backend, capsys):
    """Above the threshold a Milvus collection gets IVF_FLAT with nprobe tuned like the FAISS store's;
    held-out image-like and text-like queries keep recall@10 >= 0.95 against exact search.
    10,000 vectors: more than one page of the id-range scans the store streams them in."""
    n, dim, clusters = 10_000, tiny_backend.embed_dim, 100
    x = synthetic_embeddings(n, dim, seed=21, clusters=clusters)
    write_embeddings(tmp_path / "emb", model_record(tiny_backend), [f"/synthetic/{i}.png" for i in range(n)], x)
    loc = str(tmp_path / "ivf.db")
    assert main(["index", "build", "--from-embeddings", str(tmp_path / "emb"), "--index", loc,
                 "--ann-threshold", "2000", "--format", "json", "-q"]) == 0
    capsys.readouterr()
    with ImageIndex.open(loc, tiny_backend) as index:
        info = index.info()["index"]
        assert info["kind"] == "ivf" and info["nlist"] == fi.nlist_for(n) and info["tuned_recall_at_10"] >= 0.97
        assert 1 <= info["nprobe"] < info["nlist"] and len(index) == n
        ids, stored = index.vectors()
        for name, q in (("image", synthetic_embeddings(200, dim, 22, clusters)),
                        ("text", text_like(synthetic_embeddings(200, dim, 23, clusters), seed=24))):
            exact, _ = fi.exact_knn(q, [(ids, stored)], 10)
            hits = index.search_vectors(q, k=10)
            scores = np.array([[h.score for h in hs] for hs in hits], np.float32)
            recall = fi.recall_at_k(scores, np.array([[h.id for h in hs] for hs in hits]), exact, 10)
            assert recall >= 0.95, f"{name} recall@10 {recall:.3f} at nprobe {info['nprobe']}/{info['nlist']}"


CHILD = textwrap.dedent("""
    import os, sys, time
    from fsclip.search.stores import milvus

    def pause():
        print("PAUSED", flush=True)
        time.sleep(600)

    where = os.environ["FSCLIP_TEST_KILL_AT"]
    if where == "push":  # staged rows upserted into Milvus (invisible), the generation not published
        real = milvus.MilvusStore._push
        def push(self, *a, **kw):
            real(self, *a, **kw)
            pause()
        milvus.MilvusStore._push = push
    else:  # published in Milvus (one property write); the catalog does not know yet
        real = milvus.MilvusStore._set_info
        def set_info(self, *a, **kw):
            real(self, *a, **kw)
            pause()
        milvus.MilvusStore._set_info = set_info

    from fsclip.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _child(tmp_path, argv, where: str | None) -> None:
    """`fsclip ARGV` in another process (Milvus Lite: one process per folder); with `where`, SIGKILLed there."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    if where is None:
        proc = subprocess.run([sys.executable, "-m", "fsclip", *argv], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        return
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**env, "FSCLIP_TEST_KILL_AT": where})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 180)
        line = proc.stdout.readline() if ready else ""
        assert line == "PAUSED\n", f"child did not reach the kill point: {line!r} {proc.stderr.read() if not ready else ''}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


@needs_milvus
@pytest.mark.parametrize("where", ["push", "published"])
def test_update_killed_while_publishing_to_milvus_resumes(tmp_path, tiny_openclip_dir, tiny_backend, where, capsys):
    """SIGKILL after the staged rows went into Milvus, or after Milvus published but before the catalog
    heard: readers see the old or the new generation whole, and the same command finishes with no row
    lost, none duplicated, no orphan left in the collection."""
    photos = tmp_path / "photos"
    render_photos(photos / "a", 12, seed=31)
    loc = str(tmp_path / "k.db")
    build = ["index", "build", str(photos), "--index", loc, "--model", str(tiny_openclip_dir), "--device", "cpu",
             "--format", "json", "-q"]
    _child(tmp_path, build, None)
    first = {str(p) for p in (photos / "a").glob("*.png")}
    render_photos(photos / "b", 8, seed=32, start=100)
    (photos / "a" / "img0000.png").unlink()
    _child(tmp_path, build, where)

    # this process opens it from here on (Milvus Lite keeps it until the process ends)
    reader = ImageIndex.open(loc, tiny_backend)
    seen = {h.path for h in reader.search(text="x", k=50)}
    now = {str(p) for p in photos.rglob("*.png")}
    assert seen == (first if where == "push" else now)
    assert main(build) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == 19 and report["embedded"] == 0  # everything was committed before the kill
    assert {h.path for h in reader.search(text="x", k=50)} == now and len(reader) == 19
    store = reader.store
    every = store.client.query(store.collection, filter="id >= 0", output_fields=["id", "added_gen", "removed_gen"],
                               limit=1000)
    live = [r for r in every if r["removed_gen"] == 0]
    assert len(live) == 19 and len({r["id"] for r in every}) == len(every)
    assert all(r["added_gen"] <= reader.generation for r in every)  # no staged leftovers
    con = store.catalog()
    assert con.execute("SELECT count(*) FROM files WHERE removed_gen IS NULL").fetchone()[0] == 19
    assert con.execute("SELECT count(*) FROM vectors").fetchone()[0] == 0  # published vectors live in Milvus only
    reader.close()


@needs_milvus
def test_a_milvus_lite_index_open_in_another_process(tmp_path, tiny_backend, capsys):
    loc = str(tmp_path / "busy.db")
    with ImageIndex.create(loc, tiny_backend):
        pass
    # the folder is now held by this process; another process cannot open it
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "fsclip", "index", "info", loc], capture_output=True, text=True,
                          env=env, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("fsclip: error: cannot open") and "one process at a time" in lines[0]


@needs_milvus
def test_a_writer_without_the_catalog_rebuilds_it_from_the_collection(tmp_path, tiny_backend):
    """Another machine (or a lost state folder): the catalog comes back from the collection's rows and
    roots; nothing is re-embedded, and updates carry on."""
    photos = tmp_path / "photos"
    paths = render_photos(photos, 10, seed=41)
    index = ImageIndex.create(str(tmp_path / "a.db"), tiny_backend)
    index.add([photos])
    before = [h.path for h in index.search(text="a red circle", k=10)]
    index.remove([paths[0]])  # an exclusion is the writer's own record: lost with the catalog
    stale = tmp_path / "stale"
    shutil.copytree(tmp_path / "a.db" / "fsclip", stale)
    shutil.rmtree(tmp_path / "a.db" / "fsclip")
    assert index.info()["bad_files"] == 0 and index.info()["pending"] is None  # a reader needs no catalog
    assert index.search(text="a red circle", k=10)[0].path in before

    render_photos(photos, 1, seed=42, start=50)
    shutil.copy(paths[3], photos / "copy.png")  # known content: its vector comes from Milvus, not the model
    report = index.update()
    assert (report.unchanged, report.embedded, report.reused, report.total) == (9, 2, 1, 12)  # paths[0] is back
    assert len(index) == 12 and (tmp_path / "a.db" / "fsclip" / "meta.sqlite").is_file()
    np.testing.assert_array_equal(index.encode_image(photos / "copy.png"), index.encode_image(paths[3]))
    # a catalog left behind by an older generation (the collection was restored): rebuilt as well
    index.remove([photos / "copy.png"])
    shutil.rmtree(tmp_path / "a.db" / "fsclip")
    shutil.copytree(stale, tmp_path / "a.db" / "fsclip")
    con = sqlite3.connect(tmp_path / "a.db" / "fsclip" / "meta.sqlite")
    con.execute("UPDATE info SET value = '99' WHERE key = 'generation'")
    con.commit()
    con.close()
    report = index.update()  # the exclusion of copy.png went with the catalog: it is indexed again
    assert (report.unchanged, report.reused, len(index)) == (11, 1, 12)
    assert sorted(h.path for h in index.search(text="x", k=20)) == sorted(str(p) for p in photos.glob("*.png"))
    index.close()


@needs_milvus
def test_a_memory_budget_on_milvus_is_refused_in_one_line(tmp_path, tiny_openclip_dir, capsys):
    render_photos(tmp_path / "photos", 2, seed=51)
    rc = main(["index", "build", str(tmp_path / "photos"), "--index", str(tmp_path / "m.db"), "--model",
               str(tiny_openclip_dir), "--device", "cpu", "--max-memory", "1G", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--max-memory" in err and "milvus index" in err
    assert not (tmp_path / "m.db").exists()


def test_without_pymilvus_the_milvus_store_is_one_line(tmp_path, tiny_openclip_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # as if not installed
    render_photos(tmp_path / "photos", 1, seed=61)
    rc = main(["index", "build", str(tmp_path / "photos"), "--index", str(tmp_path / "m.db"), "--model",
               str(tiny_openclip_dir), "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pip install 'fsclip[milvus]'" in err
