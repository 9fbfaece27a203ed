"""`fsclip embed --runner ray` on a real one-node Ray cluster (not local mode): the same output as the
local runner, and a killed driver resumes. One cluster for the module keeps this under a minute."""

from __future__ import annotations

import json

import numpy as np
import pytest
from embedutil import embed_argv, read_rows
from killing import kill_at

from fsclip.cli import main
from fsclip.embed import read_manifest

ray = pytest.importorskip("ray", reason="needs Ray Data: pip install 'fsclip[ray]'")


@pytest.fixture(scope="module")
def cluster():
    """A real Ray cluster of 2 CPUs in this process's session; its address lets other drivers join it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _same_output(out, reference) -> None:
    paths, emb, meta = read_rows(out)
    ref_paths, ref_emb, ref_meta = read_rows(reference)
    assert paths == ref_paths and meta == ref_meta
    assert np.abs(emb - ref_emb).max() <= 1e-6  # issue 12: both runners within 1e-6 on CPU fp32
    got, want = read_manifest(out), read_manifest(reference)
    for key in ("status", "model", "dtype", "shard_size", "inputs", "rows", "failed"):
        assert got[key] == want[key], key
    assert [s["rows"] for s in got["shards"]] == [s["rows"] for s in want["shards"]]


def test_ray_runner_equals_local_runner(cluster, tmp_path, photos, reference, capsys):
    out = tmp_path / "ray"
    assert main(embed_argv([photos], out, "--runner", "ray")) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["runner"], report["computed"], report["rows"], report["failed"]) == ("ray", 5, 38, 2)
    _same_output(out, reference)


def test_ray_driver_killed_mid_run_resumes(cluster, tmp_path, photos, reference, capsys):
    out = tmp_path / "out"
    argv = embed_argv([photos], out, "--runner", "ray")
    kill_at(tmp_path, [*argv, "--address", cluster], "recorded:2")  # a second driver on the same cluster
    done = [json.loads(line)["shard"] for line in (out / "progress.jsonl").read_text().splitlines()]
    assert len(done) == 2
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["computed"], report["resumed"]) == (3, 2)
    _same_output(out, reference)
