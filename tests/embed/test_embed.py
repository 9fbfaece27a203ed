"""`fsclip embed` with the local runner: the output format, sources, reruns and one-line errors."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from embedutil import embed_argv, read_rows

from fsclip.cli import main
from fsclip.embed import iter_tables, read_manifest
from fsclip.images import load_image


def _run(argv, capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fsclip: error: "), err
    return err[0]


def test_output_is_plain_parquet_plus_manifest(photos, reference, shapes_backend):
    manifest = json.loads((reference / "manifest.json").read_text())
    good = sorted(str(p) for p in photos.rglob("img*.png"))
    assert manifest["status"] == "complete" and manifest["format"] == "fsclip-embeddings"
    assert manifest["model"] == {"spec": "shapes", "backend": "open_clip", "fingerprint": shapes_backend.fingerprint,
                                 "dim": 64, "compute_dtype": "float32", "runtime": "torch",
                                 "has_text": True}
    assert (manifest["dtype"], manifest["shard_size"], manifest["inputs"]["count"]) == ("float32", 8, 40)
    assert {f["path"]: f["reason"] for f in manifest["failed"]} == {
        str(photos / "b/corrupt.png"): "not an image (unknown or corrupt format)",
        str(photos / "b/empty.jpg"): "empty file"}

    # shards: 5 of 8 inputs each, in sorted input order; row counts and checksums as recorded
    assert [s["file"] for s in manifest["shards"]] == [f"shards/part-{i:05d}.parquet" for i in range(5)]
    for s in manifest["shards"]:
        data = (reference / s["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
        assert pq.read_metadata(reference / s["file"]).num_rows == s["rows"]
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["rows"] == 38

    schema = pq.read_schema(reference / manifest["shards"][0]["file"])
    assert schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert schema.names == ["path", "hash", "size", "mtime_ns", "width", "height", "embedding"]
    paths, emb, meta = read_rows(reference)
    assert paths == good

    # the oracle: the backend's own encoding of each image, one at a time
    pixels = torch.stack([shapes_backend.preprocess(load_image(p)) for p in good])
    expected = shapes_backend.encode_images(pixels).numpy()
    assert np.abs(emb - expected).max() <= 1e-6
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    for p, h, size, mtime, w, hgt in zip(paths, *meta.values()):
        data = open(p, "rb").read()
        assert h == hashlib.blake2b(data, digest_size=16).hexdigest() and size == len(data)
        assert mtime == os.stat(p).st_mtime_ns and (w, hgt) == (48, 48)
    assert sum(t.num_rows for t in iter_tables(reference, columns=["path"])) == 38


def test_content_hash_is_the_search_index_hash(photos):
    """`--from-embeddings` matches shard rows to index rows by this hash; one definition of it."""
    from fsclip.embed import probe
    from fsclip.search._scan import probe as index_probe

    for p in sorted(photos.rglob("img000*.png")):
        meta, _ = probe(str(p))
        assert index_probe(str(p)) == (meta.hash, meta.width, meta.height)


def test_rerun_of_a_finished_output_recomputes_nothing(tmp_path, photos, capsys):
    out = tmp_path / "out"
    first = _run(embed_argv([photos], out), capsys)
    assert (first["computed"], first["resumed"], first["embedded"], first["failed"]) == (5, 0, 38, 2)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    again = _run(embed_argv([photos], out, "--runner", "local"), capsys)
    assert (again["computed"], again["resumed"], again["embedded"], again["rows"]) == (0, 5, 0, 38)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == stamps


def test_fp16_halves_the_embedding_column(tmp_path, photos, reference, capsys):
    out = tmp_path / "half"
    _run(embed_argv([photos], out, "--fp16"), capsys)
    table = pq.read_table(out / "shards")
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 64)
    assert read_manifest(out)["dtype"] == "float16"
    half = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, 64)
    _, full, _ = read_rows(reference)
    assert half.dtype == np.float16 and np.array_equal(half, full.astype(np.float16))  # same compute, then cast


    def embedding_bytes(folder):  # the embedding column's bytes on disk, over all shards
        metas = [pq.read_metadata(f) for f in sorted((folder / "shards").glob("*.parquet"))]
        return sum(m.row_group(g).column(6).total_compressed_size for m in metas for g in range(m.num_row_groups))

    assert embedding_bytes(out) < 0.55 * embedding_bytes(reference)


def test_lists_tables_and_uris_as_sources(tmp_path, photos, reference, capsys):
    import fsspec

    good = sorted(photos.rglob("img*.png"))
    lst = tmp_path / "lists" / "some.txt"
    lst.parent.mkdir()
    rel = [os.path.relpath(p, lst.parent) for p in good[:10]]
    lst.write_text("# first ten, relative to this list\n" + "\n".join(rel + rel[:3]) + "\n\n")  # duplicates
    with open(tmp_path / "more.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "URI"])
        writer.writerows([["x", str(p)] for p in good[10:25]])
    pq.write_table(pa.table({"path": [str(p) for p in good[25:]], "n": list(range(len(good) - 25))}),
                   tmp_path / "rest.parquet")
    out = tmp_path / "out"
    report = _run(embed_argv([lst, tmp_path / "more.csv", tmp_path / "rest.parquet"], out), capsys)
    assert (report["images"], report["rows"], report["failed"]) == (38, 38, 0)
    paths, emb, _ = read_rows(out)
    ref_paths, ref_emb, _ = read_rows(reference)
    assert paths == ref_paths and np.abs(emb - ref_emb).max() <= 1e-6

    # URIs go through fsspec: the in-process memory filesystem stands in for a bucket
    fs = fsspec.filesystem("memory")
    for p in good[:5]:
        fs.pipe(f"/bucket/photos/{p.name}", p.read_bytes())
    fs.pipe("/bucket/photos/.hidden.png", good[0].read_bytes())
    uri_out = tmp_path / "uri"
    report = _run(embed_argv(["memory://bucket/photos"], uri_out), capsys)
    paths, emb, meta = read_rows(uri_out)
    assert paths == [f"memory:///bucket/photos/{p.name}" for p in good[:5]]
    assert np.abs(emb - ref_emb[:5]).max() <= 1e-6  # good[:5] are the first five reference rows
    assert meta["size"] == [p.stat().st_size for p in good[:5]] and meta["width"] == [48] * 5


def test_unreadable_listed_files_are_recorded_not_fatal(tmp_path, photos, capsys):
    lst = tmp_path / "list.txt"
    lst.write_text(f"{photos / 'a/img0000.png'}\n{tmp_path / 'gone.png'}\n{photos / 'b/corrupt.png'}\n")
    report = _run(embed_argv([lst], tmp_path / "out"), capsys)
    assert (report["rows"], report["failed"]) == (1, 2)
    failed = {f["path"]: f["reason"] for f in read_manifest(tmp_path / "out")["failed"]}
    assert failed == {str(tmp_path / "gone.png"): "no such file",
                      str(photos / "b/corrupt.png"): "not an image (unknown or corrupt format)"}


def test_bad_sources_are_one_line_errors(tmp_path, photos, capsys):
    out = tmp_path / "out"
    assert "no such file or folder: " in _one_line_error(embed_argv([tmp_path / "nope"], out), capsys)
    (tmp_path / "t.csv").write_text("file,label\na.png,cat\n")
    line = _one_line_error(embed_argv([tmp_path / "t.csv"], out), capsys)
    assert "has no a path, uri or url column (columns: file, label)" in line and "--column" in line
    line = _one_line_error(embed_argv(["foo://bucket/photos/"], out), capsys)
    assert "unknown URI scheme 'foo'" in line
    (tmp_path / "empty").mkdir()
    assert "no images found" in _one_line_error(embed_argv([tmp_path / "empty"], out), capsys)
    assert not out.exists()  # nothing is created before the sources check out
    assert "argument --shard-size: must be >= 1, got 0" in _one_line_error(
        embed_argv([photos], out, "--shard-size", "0"), capsys)
    line = _one_line_error(embed_argv([photos], out, "--address", "auto"), capsys)
    assert line == "fsclip: error: --address applies to --runner ray only"


def test_remote_scheme_without_its_package_names_what_to_install(tmp_path, capsys):
    import importlib.util

    missing = next((proto for proto, pkg in (("s3", "s3fs"), ("gs", "gcsfs"), ("abfs", "adlfs"))
                    if importlib.util.find_spec(pkg) is None), None)
    if missing is None:
        pytest.skip("s3fs, gcsfs and adlfs are all installed")
    line = _one_line_error(embed_argv([f"{missing}://bucket/photos/"], tmp_path / "out"), capsys)
    assert f"reading {missing}:// URIs" in line and "pip install 'fsclip[remote]'" in line


def test_rerun_with_another_job_into_the_same_out_is_refused(tmp_path, photos, tiny_openclip_dir, capsys):
    out = tmp_path / "out"
    _run(embed_argv([photos / "a"], out), capsys)
    line = _one_line_error(embed_argv([photos / "a"], out, "--shard-size", "4"), capsys)
    assert "was sharded with --shard-size 8, not 4" in line
    argv = embed_argv([photos / "a"], out)
    argv[argv.index("shapes")] = str(tiny_openclip_dir)
    assert "holds embeddings from --model shapes" in _one_line_error(argv, capsys)
    assert "stores float32 embeddings (run without --fp16)" in _one_line_error(
        embed_argv([photos / "a"], out, "--fp16"), capsys)
    assert "different set of images (20 then, 40 now)" in _one_line_error(embed_argv([photos], out), capsys)
    journal = out / "progress.jsonl"
    journal.write_text(journal.read_text().splitlines(keepends=True)[0])  # as if killed after shard 0
    line = _one_line_error(embed_argv([photos / "a"], out, "--dtype", "bf16"), capsys)
    assert "was computed in float32, this run would use bfloat16" in line
    report = _run(embed_argv([photos / "a"], out), capsys)  # the same job still resumes
    assert (report["computed"], report["resumed"], report["rows"]) == (2, 1, 20)


def test_out_must_be_an_embed_folder(tmp_path, photos, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    line = _one_line_error(embed_argv([photos / "a"], tmp_path / "mine"), capsys)
    assert "is not an `fsclip embed` output folder" in line
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_ray_rows_of_a_shard_whose_files_all_failed_still_make_a_shard():
    """The Ray driver's collector: rows arrive out of order; a shard of failures is an empty Parquet file."""
    from fsclip.distributed.ray import _Collector
    from fsclip.embed import Shard, shard_bytes

    written = []
    collector = _Collector([Shard(0, 0, ("a", "b")), Shard(1, 2, ("c",))], written.append)
    ints = {k: np.array([-1, 7]) for k in ("size", "mtime_ns", "width", "height")}
    collector.add({"row": np.array([2, 1]), "path": np.array(["c", "b"], object), "hash": np.array(["", "h"], object),
                   **ints, "error": np.array(["empty file", ""], object), "embedding": np.ones((2, 4), np.float32)})
    assert [r.shard for r in written] == [1] and written[0].failed == [("c", "empty file")]
    collector.add({"row": np.array([0]), "path": np.array(["a"], object), "hash": np.array([""], object),
                   **{k: np.array([-1]) for k in ints}, "error": np.array(["no such file"], object),
                   "embedding": np.zeros((1, 4), np.float32)})
    assert [r.shard for r in written] == [1, 0] and written[1].paths == ["b"]
    assert written[1].metas[0].size == 7 and written[1].metas[0].mtime_ns == 7
    assert pq.read_table(pa.BufferReader(shard_bytes(written[0], 4))).num_rows == 0


def test_missing_ray_is_one_line_with_the_install_command(tmp_path, photos, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does where Ray is not installed
    line = _one_line_error(embed_argv([photos], tmp_path / "out", "--runner", "ray"), capsys)
    assert line == "fsclip: error: --runner ray needs Ray Data: pip install 'fsclip[ray]'"


@pytest.mark.parametrize("kind", ["open_clip", "transformers"])
def test_transform_is_preprocess_without_the_weights(kind, shapes_backend, tiny_hf_clip_dir, rgb_images):
    """Ray ships `Backend.transform` to every decoding task: the same pixels, and no model inside."""
    import pickle

    from fsclip.backends import load_model

    backend = shapes_backend if kind == "open_clip" else load_model(str(tiny_hf_clip_dir), device="cpu")
    shipped = pickle.loads(pickle.dumps(backend.transform))
    for img in rgb_images:
        assert torch.equal(shipped(img), backend.preprocess(img))
    weights = sum(t.numel() * t.element_size() for t in backend.model.state_dict().values())
    assert len(pickle.dumps(backend.transform)) < min(100_000, weights / 10)


def test_load_image_reads_uris_and_file_objects(photos):
    import io

    import fsspec

    path = photos / "a" / "img0003.png"
    fsspec.filesystem("memory").pipe("/load/img.png", path.read_bytes())
    want = np.asarray(load_image(path))
    assert np.array_equal(np.asarray(load_image("memory://load/img.png")), want)
    assert np.array_equal(np.asarray(load_image(io.BytesIO(path.read_bytes()))), want)
    with pytest.raises(ValueError, match="no such file"):
        load_image("memory://load/missing.png")
