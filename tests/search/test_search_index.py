"""ImageIndex: search against brute force, filters, query combination, model checks, bad files, consistency."""

from __future__ import annotations

import fnmatch
import os
import sqlite3
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from searchutil import render_photos, set_mtime

from fsclip.errors import DataError, IndexError_, UsageError
from fsclip.search import AnnConfig, ImageIndex, Where

T0 = 1_600_000_000  # mtimes are set explicitly, so time filters are deterministic


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_backend):
    """60 images in two folders of different pixel sizes and mtimes, indexed with the tiny model."""
    root = tmp_path_factory.mktemp("photos")
    small = render_photos(root / "small", 30, seed=1, size=32)
    big = render_photos(root / "big", 30, seed=2, size=48)
    for i, p in enumerate(small + big):
        set_mtime(p, T0 + 86400 * i)
    wide = root / "big" / "wide.png"
    Image.open(big[0]).resize((80, 40)).save(wide)
    set_mtime(wide, T0)
    index = ImageIndex.create(tmp_path_factory.mktemp("idx") / "my.idx", tiny_backend)
    report = index.add([root])
    assert report.embedded == 61 and report.failed == 0
    return index, root


def _brute(index: ImageIndex, q: np.ndarray, k: int, keep=None):
    """torch.topk over the stored vectors: the oracle for exact search."""
    ids, vecs = index.vectors()
    if keep is not None:
        con = sqlite3.connect(index.path / "meta.sqlite")
        con.row_factory = sqlite3.Row
        meta = {r["id"]: {**dict(r), "path": os.fsdecode(r["path"])}  # paths are stored as bytes
                for r in con.execute("SELECT * FROM files WHERE removed_gen IS NULL")}
        con.close()
        mask = np.array([bool(keep(meta[int(i)])) for i in ids])
        ids, vecs = ids[mask], vecs[mask]
    top = torch.topk(torch.from_numpy(vecs) @ torch.from_numpy(q), min(k, len(ids)))
    return ids[top.indices.numpy()], top.values.numpy()


def _check(hits, ids, scores):
    assert [h.id for h in hits] == list(ids)
    np.testing.assert_allclose([h.score for h in hits], scores, rtol=1e-5, atol=1e-6)


def test_flat_search_equals_torch_topk(built):
    index, _ = built
    assert index.kind == "flat" and len(index) == 61
    rng = np.random.default_rng(0)
    queries = [*index.encode_text(["a red circle", "a blue star", "a photo of something green."]),
               *rng.standard_normal((3, index.dim)).astype(np.float32)]
    for q in queries:
        for k in (1, 10, 100):
            _check(index.search_vectors(q[None], k=k)[0], *_brute(index, q, k))
    # the text entry point is the same search
    hits = index.search(text="a red circle", k=10)
    _check(hits, *_brute(index, index.encode_text(["a red circle"])[0], 10))


@pytest.mark.parametrize("where, keep", [
    (Where(path_glob="*/small/*"), lambda r: "/small/" in r["path"]),
    (Where(path_glob="*img000?.png"), lambda r: fnmatch.fnmatchcase(r["path"].rsplit("/", 1)[1], "img000?.png")),
    (Where(min_width=40), lambda r: r["width"] >= 40),
    (Where(max_height=40, min_width=48), lambda r: r["height"] <= 40 and r["width"] >= 48),
    (Where(modified_after=T0 + 86400 * 10, modified_before=T0 + 86400 * 40),
     lambda r: T0 + 86400 * 10 <= r["mtime_ns"] / 1e9 < T0 + 86400 * 40),
], ids=["glob-folder", "glob-name", "min-width", "size-box", "mtime-range"])
def test_filters_equal_brute_force_over_metadata(built, where, keep):
    index, root = built
    q = index.encode_text(["a yellow hexagon"])[0]
    _check(index.search_vectors(q[None], k=15, where=where)[0], *_brute(index, q, 15, keep))


def test_prefix_filter_and_dict_filter(built):
    index, root = built
    prefix = str(root / "big") + "/"
    hits = index.search(text="a red circle", k=100, where={"path_prefix": prefix})
    assert len(hits) == 31 and all(h.path.startswith(prefix) for h in hits)
    assert index.search(text="x", where=Where(path_glob="*.jpg")) == []  # nothing matches: no results
    with pytest.raises(UsageError, match="unknown filter 'colour'"):
        index.search(text="x", where={"colour": "red"})


def test_combined_positive_and_negative_queries(built):
    index, _ = built
    t = index.encode_text(["a dog", "a beach", "people"])
    img_path = sorted(index.roots())[0] + "/small/img0003.png"
    img_vec = index.vectors()[1][list(index.vectors()[0]).index(index.lookup(img_path).id)]
    hits = index.search(text=["a dog", "a beach"], image=img_path, negative_text="people", k=10)
    q = (t[0] + t[1] + img_vec) / 3 - 0.5 * t[2]
    _check(hits, *_brute(index, q, 10))
    # an indexed example finds itself first, with its stored vector (score 1)
    top = index.search(image=img_path, k=3)[0]
    assert top.path == img_path and top.score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UsageError, match="at least one positive"):
        index.search(negative_text="people")
    with pytest.raises(UsageError, match="k must be"):
        index.search(text="x", k=0)
    with pytest.raises(DataError, match="cannot use query image"):
        index.search(image="/no/such/image.jpg")


def test_refuses_another_model(built, tiny_hf_clip_dir):
    index, _ = built
    from fsclip.backends import load_model

    other = load_model(str(tiny_hf_clip_dir), device="cpu")  # same dim (16), other weights
    assert other.embed_dim == index.dim
    with pytest.raises(IndexError_, match=r"was built with model .* cannot query it"):
        ImageIndex.open(index.path, model=other)


def test_open_errors(tmp_path, built, tiny_backend):
    with pytest.raises(IndexError_, match="no index at"):
        ImageIndex.open(tmp_path / "missing.idx")
    (tmp_path / "folder").mkdir()
    with pytest.raises(IndexError_, match="not an fsclip index"):
        ImageIndex.open(tmp_path / "folder")
    with pytest.raises(IndexError_, match="not an fsclip index; refusing to overwrite"):
        ImageIndex.create(tmp_path / "folder", tiny_backend, overwrite=True)
    index, _ = built
    with pytest.raises(IndexError_, match="already exists"):
        ImageIndex.create(index.path, tiny_backend)
    # an index from a future schema is refused with a clear message
    import shutil

    copy = tmp_path / "copy.idx"
    shutil.copytree(index.path, copy)
    con = sqlite3.connect(copy / "meta.sqlite")
    con.execute("UPDATE info SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(IndexError_, match="schema version 99 is not supported"):
        ImageIndex.open(copy)


def test_bad_files_are_skipped_and_recorded(tmp_path, tiny_backend):
    photos = tmp_path / "photos"
    good = render_photos(photos, 5, seed=3)
    (photos / "empty.png").write_bytes(b"")
    (photos / "text.jpg").write_text("not an image")
    data = good[0].read_bytes()
    (photos / "truncated.png").write_bytes(data[: len(data) // 3])
    index = ImageIndex.create(tmp_path / "i.idx", tiny_backend)
    report = index.add([photos])
    assert (report.embedded, report.failed, report.total) == (5, 3, 5)
    reasons = {e["path"].rsplit("/", 1)[1]: e["reason"] for e in index.errors()}
    assert set(reasons) == {"empty.png", "text.jpg", "truncated.png"}
    assert reasons["empty.png"] == "empty file" and "not an image" in reasons["text.jpg"]
    assert index.info()["bad_files"] == 3
    # unchanged bad files are not retried; a repaired one is indexed and leaves the list
    again = index.update()
    assert (again.known_bad, again.embedded, again.failed) == (3, 0, 0)
    Image.open(good[1]).save(photos / "text.jpg", format="JPEG")
    fixed = index.update()
    assert (fixed.embedded, fixed.known_bad, fixed.total) == (1, 2, 6)
    assert "text.jpg" not in {e["path"].rsplit("/", 1)[1] for e in index.errors()}


def test_reader_sees_old_or_new_state_during_update(tmp_path, tiny_backend):
    """A reader searching while another index object adds and removes files sees whole generations only."""
    photos = tmp_path / "photos"
    first = render_photos(photos, 40, seed=4)
    writer = ImageIndex.create(tmp_path / "c.idx", tiny_backend)
    writer.add([photos])
    reader = ImageIndex.open(writer.path, tiny_backend)
    old = {str(p) for p in first}
    render_photos(photos, 40, seed=5, start=40)
    for p in first[:10]:
        p.unlink()
    new = {str(p) for p in photos.iterdir()}
    seen, stop = [], threading.Event()

    def read():
        q = np.ones((1, reader.dim), np.float32)
        while not stop.is_set():  # k=100 > both sizes: each answer lists a whole generation
            seen.append({h.path for h in reader.search_vectors(q, k=100)[0]})

    t = threading.Thread(target=read)
    t.start()
    try:
        report = writer.update(batch_size=4)
    finally:
        stop.set()
        t.join()
    assert (report.embedded, report.removed, report.total) == (40, 10, 70)
    assert seen, "the reader thread did not run"
    for paths in seen:
        assert paths in (old, new), "reader saw a mix of two generations"
    reader.search_vectors(np.ones((1, reader.dim), np.float32), k=1)
    assert len(reader) == 70  # its next search picked up the new generation by itself


def test_ivf_index_end_to_end(tmp_path, tiny_backend):
    """Above the threshold the index is IVF; results stay close to exact, through deletions too."""
    photos = tmp_path / "photos"
    paths = render_photos(photos, 360, seed=6)
    index = ImageIndex.create(tmp_path / "ivf.idx", tiny_backend, ann=AnnConfig(ann_threshold=300))
    index.add([photos])
    info = index.info()
    assert info["index"]["kind"] == "ivf" and info["index"]["tuned_recall_at_10"] >= 0.97
    queries = index.encode_text(["a red circle", "a green star", "a black square", "a white cross"])
    queries = np.concatenate([queries, np.random.default_rng(0).standard_normal((20, index.dim)).astype(np.float32)])

    def recall() -> float:
        got = index.search_vectors(queries, k=10)
        hits = 0
        for q, hs in zip(queries, got):
            _, exact_scores = _brute(index, q, 10)
            hits += sum(h.score >= exact_scores[-1] - 1e-5 for h in hs)
        return hits / (10 * len(queries))

    assert recall() >= 0.95
    for p in paths[:100]:
        p.unlink()
    report = index.update()
    assert report.removed == 100 and len(index) == 260 and index.kind == "ivf"
    assert recall() >= 0.95
    assert not {str(p) for p in paths[:100]} & {h.path for h in index.search(text="a red circle", k=260)}
    for p in paths[100:250]:
        p.unlink()
    index.update()
    assert len(index) == 110 and index.kind == "flat"  # below half the threshold: back to exact search
