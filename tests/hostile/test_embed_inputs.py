"""`fsclip embed` misused: nothing usable, a cluster that is not there (one line, the documented exit code)."""

from __future__ import annotations

import pytest

from fsclip.cli import main


def _embed(tmp_path, *argv) -> list[str]:
    return ["embed", *map(str, argv), "--out", str(tmp_path / "out"), "--model", "shapes", "--device", "cpu",
            "-q"]


def test_user_embeds_only_files_that_are_not_images(tmp_path, capsys):
    """Like classify: exit 1 when no image could be used; the reasons are kept in the manifest."""
    (tmp_path / "notes.png").write_bytes(b"plain text, not a PNG")
    assert main(_embed(tmp_path, tmp_path / "notes.png")) == 1
    assert "1 file could not be used" in capsys.readouterr().out
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_user_points_the_ray_runner_at_a_cluster_that_is_not_there(tmp_path, capsys):
    pytest.importorskip("ray", reason="pip install 'fsclip[ray]'")
    (tmp_path / "photos").mkdir()
    import numpy as np

    from fsclip.shapes.world import render

    render("red", "circle", np.random.default_rng(0), 48).save(tmp_path / "photos" / "a.png")
    code = main(_embed(tmp_path, tmp_path / "photos", "--runner", "ray", "--address", "127.0.0.1:1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("fsclip: error: cannot start or join the Ray cluster at 127.0.0.1:1")
