"""The store contract, once per engine (FAISS folder, embedded Milvus Lite): the same behaviour through
`ImageIndex`, the CLI and the web service, checked against brute force over the stored vectors.

Milvus tests skip when pymilvus / milvus-lite are missing (`pip install 'fsclip[milvus]'`).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from searchutil import model_record, render_photos, set_mtime, write_embeddings

from fsclip.cli import main
from fsclip.errors import IndexError_
from fsclip.search import ImageIndex, Where

MILVUS = importlib.util.find_spec("pymilvus") is not None and importlib.util.find_spec("milvus_lite") is not None
ENGINES = ["faiss", pytest.param("milvus", marks=pytest.mark.skipif(
    not MILVUS, reason="Milvus Lite is not installed: pip install 'fsclip[milvus]'"))]
T0 = 1_600_000_000


def location(engine: str, folder, name: str = "idx") -> str:
    return str(folder / (f"{name}.idx" if engine == "faiss" else f"{name}.db"))


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _brute(index: ImageIndex, q: np.ndarray, k: int, keep=None) -> tuple[list[str], np.ndarray]:
    """torch.topk over every stored vector (optionally only entries `keep(hit)` accepts): the oracle."""
    ids, vecs = index.vectors()
    hits = index.search_vectors(np.zeros((1, index.dim), np.float32), k=len(ids))[0]  # every entry, any order
    by_id = {h.id: h for h in hits}
    mask = np.array([keep is None or bool(keep(by_id[int(i)])) for i in ids], bool)
    ids, vecs = ids[mask], vecs[mask]
    top = torch.topk(torch.from_numpy(vecs) @ torch.from_numpy(q), min(k, len(ids)))
    return [by_id[int(i)].path for i in ids[top.indices.numpy()]], top.values.numpy()


def _same(hits, expected) -> None:
    paths, scores = expected
    np.testing.assert_allclose([h.score for h in hits], scores, rtol=1e-5, atol=1e-5)
    if len(np.unique(np.round(scores, 4))) == len(scores):  # no ties: the order is determined
        assert [h.path for h in hits] == paths


@pytest.fixture(scope="module", params=ENGINES)
def built(request, tmp_path_factory, tiny_backend):
    """40 photos in two folders of different sizes and mtimes (one with a Latin-1 name), indexed on each engine."""
    engine = request.param
    root = tmp_path_factory.mktemp(f"contract-{engine}")
    small = render_photos(root / "photos" / "small", 20, seed=1, size=32)
    big = render_photos(root / "photos" / "big", 20, seed=2, size=48)
    for i, p in enumerate(small + big):
        set_mtime(p, T0 + 86400 * i)
    odd = os.path.join(os.fsencode(root / "photos" / "big"), b"caf\xe9.png")
    shutil.copy(os.fsencode(big[0]), odd)
    index = ImageIndex.create(location(engine, root), tiny_backend)
    report = index.add([root / "photos"])
    assert (report.embedded, report.reused, report.total) == (40, 1, 41)
    yield engine, index, root
    index.close()


def test_search_equals_brute_force(built):
    _, index, _ = built
    assert index.kind == "flat" and len(index) == 41
    queries = [*index.encode_text(["a red circle", "a blue star"]),
               *np.random.default_rng(0).standard_normal((2, index.dim)).astype(np.float32)]
    for q in queries:
        for k in (1, 10, 50):
            _same(index.search_vectors(q[None], k=k)[0], _brute(index, q, k))


def test_text_image_and_several_queries_with_negatives(built):
    _, index, root = built
    example = str(root / "photos" / "small" / "img0003.png")
    t = index.encode_text(["a dog", "a beach", "people"])
    ids, vecs = index.vectors()
    img = vecs[list(ids).index(index.lookup(example).id)]
    hits = index.search(text=["a dog", "a beach"], image=example, negative_text="people", k=10)
    _same(hits, _brute(index, (t[0] + t[1] + img) / 3 - 0.5 * t[2], 10))
    top = index.search(image=example, k=1)[0]
    assert top.path == example and top.score == pytest.approx(1.0, abs=1e-5)
    pil = Image.open(example).convert("RGB")  # an image that is not a path: encoded by the model
    assert index.search(image=pil, k=1)[0].path == example


@pytest.mark.parametrize("where, keep", [
    (Where(path_glob="*/small/*"), lambda h: "/small/" in h.path),
    (Where(path_glob="*img001[0-4].png"), lambda h: fnmatch.fnmatchcase(os.path.basename(h.path), "img001[0-4].png")),
    (Where(path_glob="*/img00?5.png"), lambda h: fnmatch.fnmatchcase(os.path.basename(h.path), "img00?5.png")),
    (Where(min_width=40), lambda h: h.width >= 40),
    (Where(max_height=40, min_width=30), lambda h: h.height <= 40 and h.width >= 30),
    (Where(modified_after=T0 + 86400 * 10, modified_before=T0 + 86400 * 30),
     lambda h: T0 + 86400 * 10 <= h.mtime < T0 + 86400 * 30),
], ids=["glob-folder", "glob-class", "glob-one-char", "min-width", "size-box", "mtime-range"])
def test_metadata_filters_equal_brute_force(built, where, keep):
    _, index, _ = built
    q = index.encode_text(["a yellow hexagon"])[0]
    expected = _brute(index, q, 15, keep)
    hits = index.search_vectors(q[None], k=15, where=where)[0]
    assert len(hits) == len(expected[0]) and all(keep(h) for h in hits)
    _same(hits, expected)


def test_prefix_filter_and_a_filter_matching_nothing(built):
    _, index, root = built
    prefix = str(root / "photos" / "big") + "/"
    hits = index.search(text="x", k=100, where={"path_prefix": prefix})
    assert len(hits) == 21 and all(h.path.startswith(prefix) for h in hits)
    assert index.search(text="x", where=Where(path_glob="*.jpg")) == []


def test_a_latin1_file_name_round_trips(built):
    _, index, root = built
    odd = os.fsdecode(os.path.join(os.fsencode(root / "photos" / "big"), b"caf\xe9.png"))
    hit = index.lookup(odd)
    assert hit is not None and hit.path == odd
    assert odd in {h.path for h in index.search(image=odd, k=2)}


def test_refuses_a_query_from_another_model(built, tiny_hf_clip_dir):
    _, index, _ = built
    from fsclip.backends import load_model

    other = load_model(str(tiny_hf_clip_dir), device="cpu")  # same dim (16), other weights
    with pytest.raises(IndexError_, match=r"was built with model .* cannot query it"):
        ImageIndex.open(index.location, model=other)


def test_index_info(built, capsys):
    engine, index, root = built
    rc, out, err = _cli(capsys, "index", "info", index.location, "--format", "json")
    assert rc == 0, err
    info = json.loads(out)
    assert (info["engine"], info["images"], info["dim"], info["bad_files"]) == (engine, 41, 16, 0)
    assert info["roots"] == [str(root / "photos")] and info["model"] == index.model_spec
    assert info["index"]["kind"] == "flat" and info["generation"] == index.generation
    rc, out, _ = _cli(capsys, "index", "info", index.location)
    assert rc == 0 and f"engine:           {engine}" in out and "images:           41" in out


def test_serve_answers_and_serves_only_indexed_files(built):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from fsclip.search.service import build_app

    _, index, root = built
    client = TestClient(build_app(index), base_url="http://127.0.0.1")
    body = client.get("/api/search", params={"q": "a red circle", "k": 5}).json()
    assert [r["path"] for r in body["results"]] == [h.path for h in index.search(text="a red circle", k=5)]
    example = root / "photos" / "small" / "img0001.png"
    resp = client.get("/api/image", params={"path": str(example)})
    assert resp.status_code == 200 and resp.content == example.read_bytes()
    assert client.get("/api/thumb", params={"path": str(example)}).status_code == 200
    like = client.get("/api/search", params={"like": str(example), "k": 1}).json()["results"][0]
    assert like["path"] == str(example) and like["score"] == pytest.approx(1.0, abs=1e-5)
    assert client.get("/api/image", params={"path": str(root / "photos" / "nope.png")}).status_code == 404
    assert client.get("/api/info").json()["images"] == 41


def test_incremental_update_new_changed_moved_deleted(tmp_path, tiny_backend, engine_param):
    engine = engine_param
    photos = tmp_path / "photos"
    paths = render_photos(photos / "a", 10, seed=3) + render_photos(photos / "b", 10, seed=4, start=10)
    index = ImageIndex.create(location(engine, tmp_path), tiny_backend)
    index.add([photos])
    reader = ImageIndex.open(index.location, tiny_backend)
    snap = reader.snapshot()
    before = {h.path for h in reader.search(text="x", k=50)}
    moved_vec = index.vectors()[1][list(index.vectors()[0]).index(index.lookup(str(paths[5])).id)]

    new = render_photos(photos / "c", 2, seed=5, start=100)
    render_photos(tmp_path / "tmp", 1, seed=6)[0].replace(paths[0])  # changed content, same name
    os.utime(paths[0], ns=(1, 1_700_000_000_000_000_000))
    moved = photos / "b" / "moved.png"
    paths[5].rename(moved)
    paths[12].unlink()
    report = index.update()
    assert (report.embedded, report.reused, report.removed, report.unchanged, report.total) == (3, 1, 2, 17, 21)

    # the reader's snapshot still answers from the old generation; its next search sees the new one
    assert {h.path for h in reader.search(text="x", k=50, snapshot=snap)} == before
    after = {h.path for h in reader.search(text="x", k=50)}
    assert after == {str(p) for p in photos.rglob("*.png")} and len(reader) == 21
    assert reader.lookup(str(paths[12])) is None and reader.lookup(str(paths[5])) is None
    ids, vecs = reader.vectors()
    np.testing.assert_array_equal(vecs[list(ids).index(reader.lookup(str(moved)).id)], moved_vec)  # reused
    assert reader.search(image=new[1], k=1)[0].path == str(new[1])
    q = np.random.default_rng(1).standard_normal(index.dim).astype(np.float32)
    _same(reader.search_vectors(q[None], k=10)[0], _brute(reader, q, 10))

    assert index.update().embedded == 0 and index.generation == reader.generation  # nothing changed: no publish
    assert index.remove([photos / "b"]) == 10 and len(index) == 11
    assert index.update().total == 11  # removed folders stay out
    reader.close()
    index.close()


def test_bulk_load_from_embeddings(tmp_path, tiny_backend, tiny_openclip_dir, engine_param, capsys):
    """`fsclip embed` shards load without re-encoding and give the vectors of a build from the images; with
    the folders named too, those are served and kept up to date. Loading twice adds nothing; rows of files
    that are not here are searchable, never served; another model's shards are refused."""
    from fsclip.embed import embed

    engine = engine_param
    photos = tmp_path / "photos"
    paths = render_photos(photos, 12, seed=7)
    (photos / "broken.png").write_bytes(b"not a png")
    embed([photos], tmp_path / "emb", str(tiny_openclip_dir), device="cpu", shard_size=5)
    loc = location(engine, tmp_path)
    rc, out, err = _cli(capsys, "index", "build", photos, "--from-embeddings", tmp_path / "emb", "--index", loc,
                        "--format", "json", "-q")
    assert rc == 0, err
    report = json.loads(out)
    assert (report["loaded"], report["embedded"], report["unchanged"], report["failed"], report["total"]) == (
        12, 0, 12, 1, 12)
    reference = ImageIndex.create(location("faiss", tmp_path, "ref"), tiny_backend)
    reference.add([photos])
    with ImageIndex.open(loc) as loaded:
        for p in paths:
            np.testing.assert_allclose(loaded.encode_image(p), reference.encode_image(p), atol=1e-5)
        assert [e["path"] for e in loaded.errors()] == [str(photos / "broken.png")]
        gen = loaded.generation

    rc, out, err = _cli(capsys, "index", "update", loc, "--from-embeddings", tmp_path / "emb", "--format", "json", "-q")
    assert rc == 0, err
    assert (json.loads(out)["loaded"], json.loads(out)["unchanged"], json.loads(out)["total"]) == (0, 12, 12)
    with ImageIndex.open(loc) as again:
        assert again.generation == gen and len(again) == 12

    # a row of a file that is not here, and one whose shard row does not describe the file on disk
    vec = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    write_embeddings(tmp_path / "more", model_record(tiny_backend), ["/gone/a.png", str(paths[0])], vec)
    rc, out, err = _cli(capsys, "index", "update", loc, "--from-embeddings", tmp_path / "more", "--format", "json",
                        "-q")
    report = json.loads(out)
    assert rc == 0 and (report["loaded"], report["embedded"], report["total"]) == (2, 1, 13), err  # paths[0] re-read
    with ImageIndex.open(loc) as index:
        assert index.search_vectors(vec[:1], k=1)[0][0].path == "/gone/a.png"
        np.testing.assert_allclose(index.encode_image(paths[0]), reference.encode_image(paths[0]), atol=1e-5)
        pytest.importorskip("fastapi")
        from fastapi.testclient import TestClient

        from fsclip.search.service import build_app

        client = TestClient(build_app(index), base_url="http://127.0.0.1")
        assert client.get("/api/image", params={"path": "/gone/a.png"}).status_code == 404
        resp = client.get("/api/image", params={"path": str(paths[3])})
        assert resp.status_code == 200 and resp.content == paths[3].read_bytes()
    reference.close()

    # shards of another model are refused, in one line
    record = {**model_record(tiny_backend), "fingerprint": "0123456789abcdef"}
    write_embeddings(tmp_path / "alien", record, ["/x.png"], vec[:1])
    rc, _, err = _cli(capsys, "index", "update", loc, "--from-embeddings", tmp_path / "alien")
    assert rc == 2 and err.count("\n") == 1 and "fingerprint 0123456789abcdef" in err and "Traceback" not in err


@pytest.fixture(params=ENGINES)
def engine_param(request):
    return request.param
