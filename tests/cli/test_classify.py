import csv
import io
import json

import pytest
from PIL import Image

from fsclip.cli import main


@pytest.fixture
def folder(tmp_path):
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return tmp_path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_lines_contract(folder, tiny_openclip_dir, capsys):
    code, out, _ = run(capsys, "classify", str(folder), "--model", str(tiny_openclip_dir), "--labels",
                       "red,green,blue", "--format", "json", "--top-k", "2", "-q")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["path"].rsplit("/", 1)[1] for r in records] == ["broken.jpg", "img0.png", "img1.png", "img2.png"]
    assert set(records[0]) == {"path", "error"} and "not an image" in records[0]["error"]
    for r in records[1:]:
        assert set(r) == {"path", "label", "predictions"}
        scores = [p["score"] for p in r["predictions"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True)
        assert r["label"] == r["predictions"][0]["label"] in {"red", "green", "blue"}


def test_csv_and_table(folder, tiny_openclip_dir, capsys):
    code, out, _ = run(capsys, "classify", str(folder / "img0.png"), "--model", str(tiny_openclip_dir),
                       "--labels", "red,green", "--format", "csv", "-q")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["rank"] for r in rows] == ["1", "2"]
    code, out, _ = run(capsys, "classify", str(folder / "img0.png"), "--model", str(tiny_openclip_dir),
                       "--labels", "red,green", "-q")
    assert code == 0 and "img0.png" in out


def test_threshold_abstains(folder, tiny_openclip_dir, capsys):
    _, out, _ = run(capsys, "classify", str(folder / "img1.png"), "--model", str(tiny_openclip_dir),
                    "--labels", "a,b,c,d", "--threshold", "0.99", "--format", "json", "-q")
    assert json.loads(out)["label"] == "unknown"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--labels", "onlyone"], "at least 2 labels"),
        (["--labels", "a,b", "--top-k", "0"], "--top-k"),
        (["--labels", "a,b", "--templates", "nope"], "unknown template set"),
        (["--labels", "a,b", "--device", "gpu9"], "unknown device"),
        (["--labels-file", "/no/such/file"], "not found"),
    ],
)
def test_usage_errors_are_one_line_exit_2(folder, tiny_openclip_dir, capsys, argv, message):
    code, _, err = run(capsys, "classify", str(folder), "--model", str(tiny_openclip_dir), "-q", *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("fsclip: error")]
    assert len(lines) == 1 and message in lines[0]


def test_nothing_readable_exits_nonzero(tmp_path, tiny_openclip_dir, capsys):
    (tmp_path / "a.png").write_bytes(b"")
    code, out, _ = run(capsys, "classify", str(tmp_path), "--model", str(tiny_openclip_dir), "--labels", "a,b",
                       "--format", "json", "-q")
    assert code == 1 and json.loads(out)["error"] == "empty file"
    code, _, err = run(capsys, "classify", str(tmp_path / "missing"), "--model", str(tiny_openclip_dir),
                       "--labels", "a,b", "-q")
    assert code == 2 and "no such file" in err


def test_libraries_stay_quiet_unless_verbose(folder, tiny_hf_clip_dir):
    """transformers prints through a handler of its own (config notes, a weight-loading bar): with -q
    none of it reaches stderr, with -v it does."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    args = ["classify", str(folder / "img0.png"), "--model", str(tiny_hf_clip_dir), "--labels", "red,green"]
    quiet = subprocess.run([sys.executable, "-m", "fsclip", *args, "-q"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = subprocess.run([sys.executable, "-m", "fsclip", "-v", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert loud.returncode == 0 and "Loading weights" in loud.stderr, loud.stderr


def test_python_warnings_go_through_the_filtered_log(caplog):
    """Without -v a library's warnings.warn (a deprecation inside transformers or PEFT) becomes a log
    record of `py.warnings`, which the CLI's handler drops unless --verbose."""
    import logging
    import warnings

    from fsclip.cli import _hush_libraries

    try:
        _hush_libraries(quiet=False)
        with caplog.at_level(logging.WARNING, logger="py.warnings"):
            warnings.warn("library chatter", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
    assert [r.name for r in caplog.records if "library chatter" in r.getMessage()] == ["py.warnings"]
