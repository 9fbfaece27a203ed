import re

from fsclip.cli import main


def test_demo_runs_offline_and_reports_accuracy(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "-q"]) == 0
    out = capsys.readouterr().out
    seen = re.search(r"accuracy on seen\s+combinations: (\d+)/(\d+)", out)
    unseen = re.search(r"accuracy on unseen combinations: (\d+)/(\d+)", out)
    assert seen and unseen
    assert int(seen.group(1)) >= int(seen.group(2)) - 1  # measured: all seen images right
    assert int(unseen.group(1)) >= int(unseen.group(2)) - 2  # measured 8/8; chance is 1/48
    assert "fsclip classify" in out
    assert len(list((tmp_path / "demo").rglob("*.png"))) == 16


def test_demo_overwrites_only_its_own_folder(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "-q"]) == 0
    assert main(["demo", "--out", str(tmp_path / "d"), "-q", "--seed", "1"]) == 0
    assert len(list((tmp_path / "d").rglob("*.png"))) == 16
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "keep.txt").write_text("user data")
    assert main(["demo", "--out", str(mine), "-q"]) == 2
    assert "not written by fsclip demo" in capsys.readouterr().err
    assert (mine / "keep.txt").read_text() == "user data"
