"""Incremental updates: add, modify, touch, delete, rename/move, copy, explicit removal; no duplicates, no loss."""

from __future__ import annotations

import os
import shutil
import sqlite3

import numpy as np
import pytest
import torch
from searchutil import render_photos

from fsclip.search import ImageIndex


def _vec(index: ImageIndex, path) -> np.ndarray:
    ids, vecs = index.vectors()
    hit = index.lookup(str(path))
    assert hit is not None, f"{path} is not indexed"
    return vecs[list(ids).index(hit.id)]


def _assert_consistent(index: ImageIndex, folder) -> None:
    """The index holds exactly the files on disk, once each, and search is still exact."""
    on_disk = sorted(str(p) for p in folder.rglob("*.png"))
    ids, vecs = index.vectors()
    con = sqlite3.connect(index.path / "meta.sqlite")
    live = sorted(os.fsdecode(r[0]) for r in con.execute("SELECT path FROM files WHERE removed_gen IS NULL"))
    con.close()
    assert live == on_disk and len(index) == len(on_disk) == len(ids)
    q = np.random.default_rng(0).standard_normal(index.dim).astype(np.float32)
    top = torch.topk(torch.from_numpy(vecs) @ torch.from_numpy(q), min(10, len(ids)))
    assert [h.id for h in index.search_vectors(q[None], k=10)[0]] == list(ids[top.indices.numpy()])


@pytest.fixture
def indexed(tmp_path, tiny_backend):
    photos = tmp_path / "photos"
    paths = render_photos(photos / "a", 12, seed=1) + render_photos(photos / "b", 12, seed=2, start=12)
    index = ImageIndex.create(tmp_path / "u.idx", tiny_backend)
    report = index.add([photos])
    assert report.embedded == 24
    return index, photos, paths


def test_noop_update_embeds_nothing_and_keeps_generation(indexed):
    index, photos, _ = indexed
    gen = index.generation
    report = index.update()
    assert (report.embedded, report.unchanged, report.removed, report.total) == (0, 24, 0, 24)
    assert index.generation == gen


def test_add_new_files(indexed):
    index, photos, _ = indexed
    new = render_photos(photos / "c", 5, seed=3, start=100)
    report = index.update()
    assert (report.embedded, report.unchanged, report.total) == (5, 24, 29)
    assert index.search(image=new[2], k=1)[0].path == str(new[2])
    _assert_consistent(index, photos)


def test_modified_file_is_reembedded(indexed, tiny_backend):
    index, photos, paths = indexed
    before = _vec(index, paths[0])
    render_photos(photos / "tmp", 1, seed=42)[0].replace(paths[0])  # new content under the old name
    os.utime(paths[0], ns=(1, 1_700_000_000_000_000_000))
    report = index.update()
    assert (report.embedded, report.reused, report.removed) == (1, 0, 0)
    after = _vec(index, paths[0])
    assert not np.allclose(before, after)
    from PIL import Image

    expected = tiny_backend.encode_images(tiny_backend.preprocess(Image.open(paths[0]).convert("RGB"))[None])[0]
    np.testing.assert_allclose(after, expected.numpy(), atol=1e-5)
    shutil.rmtree(photos / "tmp")
    index.update()
    _assert_consistent(index, photos)


def test_touched_file_reuses_its_vector(indexed):
    index, photos, paths = indexed
    before = _vec(index, paths[3])
    os.utime(paths[3], ns=(1, 1_700_000_000_000_000_000))  # same bytes, new mtime
    report = index.update()
    assert (report.embedded, report.reused) == (0, 1)
    np.testing.assert_array_equal(_vec(index, paths[3]), before)


def test_deleted_files_are_removed(indexed):
    index, photos, paths = indexed
    paths[5].unlink()
    shutil.rmtree(photos / "b")
    report = index.update()
    assert (report.removed, report.embedded, report.total) == (13, 0, 11)
    assert index.lookup(str(paths[5])) is None
    assert str(paths[5]) not in {h.path for h in index.search(text="a red circle", k=100)}
    _assert_consistent(index, photos)


def test_renamed_and_moved_files_are_not_reembedded(indexed):
    index, photos, paths = indexed
    v1, v2 = _vec(index, paths[1]), _vec(index, paths[20])
    renamed = paths[1].with_name("renamed.png")
    paths[1].rename(renamed)
    (photos / "moved").mkdir()
    moved = photos / "moved" / paths[20].name
    paths[20].rename(moved)
    report = index.update()
    assert (report.embedded, report.reused, report.removed, report.total) == (0, 2, 2, 24)
    np.testing.assert_array_equal(_vec(index, renamed), v1)
    np.testing.assert_array_equal(_vec(index, moved), v2)
    assert index.lookup(str(paths[1])) is None
    _assert_consistent(index, photos)


def test_copies_share_one_embedding(indexed):
    index, photos, paths = indexed
    dup = photos / "a" / "copy.png"
    shutil.copyfile(paths[2], dup)
    fresh = render_photos(photos / "n", 1, seed=9, start=500)[0]
    shutil.copyfile(fresh, photos / "n" / "fresh-copy.png")  # two new files, same content
    report = index.update()
    assert (report.embedded, report.reused, report.total) == (1, 2, 27)
    np.testing.assert_array_equal(_vec(index, dup), _vec(index, paths[2]))
    _assert_consistent(index, photos)


def test_remove_keeps_paths_out_until_added_again(indexed):
    index, photos, paths = indexed
    assert index.remove([paths[0], photos / "b"]) == 13
    assert len(index) == 11
    report = index.update()
    assert (report.embedded, report.reused, report.total) == (0, 0, 11)
    assert sorted(index.info()["excluded"]) == sorted([str(paths[0]), str(photos / "b")])
    assert index.remove([photos / "nothing-here"]) == 0
    report = index.add([photos / "b"])  # asking for it again brings it back (vectors recomputed)
    assert report.total == 23 and report.embedded == 12
    assert str(photos / "b") not in index.info()["excluded"]


def test_missing_root_keeps_its_entries(indexed, tmp_path):
    index, photos, _ = indexed
    photos.rename(tmp_path / "unmounted")
    report = index.update()
    assert report.missing_roots == (str(photos),) and report.removed == 0 and report.total == 24


def test_schema_1_index_is_upgraded_in_place_without_reembedding(indexed):
    """An index written by the previous schema (paths as text, no file identity) opens, searches and
    updates; its files are not re-read or re-embedded, and their identity is filled in by the next update."""
    index, photos, paths = indexed
    before = index.search(text="a red circle", k=5)
    index.close()
    con = sqlite3.connect(index.path / "meta.sqlite")
    for table in ("roots", "excludes", "files", "errors"):
        con.execute(f"UPDATE {table} SET path = CAST(path AS TEXT)")
    con.execute("ALTER TABLE files DROP COLUMN dev")
    con.execute("ALTER TABLE files DROP COLUMN ino")
    con.execute("DELETE FROM info WHERE key IN ('index_id', 'faiss_checksum')")
    con.execute("UPDATE info SET value = '1' WHERE key = 'schema_version'")
    con.commit()
    con.close()

    old = ImageIndex.open(index.path)
    assert old.info()["schema_version"] == 2 and old.info()["index_id"]
    assert [h.path for h in old.search(text="a red circle", k=5)] == [h.path for h in before]
    assert old.lookup(str(paths[0])) is not None
    report = old.update()
    assert (report.unchanged, report.embedded, report.reused) == (24, 0, 0)
    con = sqlite3.connect(index.path / "meta.sqlite")
    assert con.execute("SELECT count(*) FROM files WHERE ino IS NULL").fetchone()[0] == 0
    con.close()
