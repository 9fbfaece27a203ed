"""kill -9 of the `fsclip embed` driver at any point, then the same command: equal to an uninterrupted run.

One output folder goes through the crash points in turn, as a crash loop would: mid-encoding of a shard,
mid-write of a shard's temp file, after a shard's rename but before its journal line, and a journal line
torn by the kill. Every rerun resumes from what was recorded; the last one finishes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from embedutil import embed_argv, read_rows
from killing import kill_at

from fsclip.cli import main
from fsclip.embed import iter_tables, read_manifest
from fsclip.errors import DataError


def _recorded(out) -> list[int]:
    return [json.loads(line)["shard"] for line in (out / "progress.jsonl").read_text().splitlines()]


def test_local_driver_killed_anywhere_resumes_without_duplicates_or_loss(tmp_path, photos, reference, capsys):
    out = tmp_path / "out"
    argv = embed_argv([photos], out)  # 40 inputs, 5 shards of 8, one batch per shard

    kill_at(tmp_path, argv, "encoding:3")  # shards 0 and 1 done, shard 2 being encoded
    assert _recorded(out) == [0, 1]
    assert read_manifest(out)["status"] == "running"
    with pytest.raises(DataError, match="unfinished `fsclip embed` run"):
        next(iter_tables(out))

    kill_at(tmp_path, argv, "writing:3")  # shard 2 recomputed; shard 3's temp file half written
    assert _recorded(out) == [0, 1, 2]
    assert [p.name for p in (out / "shards").glob(".part-00003.parquet.*.tmp")]

    kill_at(tmp_path, argv, "renamed:4")  # shard 3 done; shard 4's file in place but not recorded
    assert _recorded(out) == [0, 1, 2, 3] and (out / "shards" / "part-00004.parquet").exists()
    assert not list((out / "shards").glob(".*.tmp"))  # the killed run's temp file was cleared
    with open(out / "progress.jsonl", "a") as f:  # and a kill in the middle of appending shard 4's line
        f.write('{"shard": 4, "file": "shards/part-00004.parquet", "rows": 6, "by')
    (out / ".manifest.json.k2j3h4.tmp").write_text('{"format": "fsc')  # or of rewriting the manifest

    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["computed"], report["resumed"], report["rows"], report["failed"]) == (1, 4, 38, 2)
    assert _recorded(out) == [0, 1, 2, 3, 4]

    paths, emb, meta = read_rows(out)
    ref_paths, ref_emb, ref_meta = read_rows(reference)
    assert paths == ref_paths and len(set(paths)) == len(paths)  # every image once, in order
    assert np.abs(emb - ref_emb).max() <= 1e-6 and meta == ref_meta
    got, want = read_manifest(out), read_manifest(reference)
    assert got["failed"] == want["failed"] and got["status"] == "complete"
    assert [s["rows"] for s in got["shards"]] == [s["rows"] for s in want["shards"]]
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"part-{i:05d}.parquet" for i in range(5)]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "manifest.json", "progress.jsonl", "shards"]
