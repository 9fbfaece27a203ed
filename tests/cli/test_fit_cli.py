"""`fsclip fit` and `fsclip predict` end to end on the shapes-world model, and their one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest

from fsclip.cli import main
from fsclip.shapes import COLOURS, write_folder

CLASSES = ("circle", "ring", "diamond")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit-cli")
    classes = {s: [(c, s) for c in COLOURS] for s in CLASSES}
    write_folder(root / "train", classes, 8, seed=0, size=64)
    write_folder(root / "val", classes, 3, seed=1, size=64)
    write_folder(root / "test", classes, 4, seed=2, size=64)
    return root


@pytest.fixture(scope="module")
def adapter_dir(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters") / "tip"
    assert main(["fit", str(folders / "train"), "--model", "shapes", "--method", "tip-adapter", "--out", str(out),
                 "--templates", "shapes", "--device", "cpu", "-q"]) == 0
    return out


def _records(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_fit_writes_the_adapter_and_reports_zero_shot_vs_adapter(adapter_dir):
    assert sorted(p.name for p in adapter_dir.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "metrics.json"]
    metrics = json.loads((adapter_dir / "metrics.json").read_text())
    assert metrics["val_images"] == 3 * 4  # no --val: min(k // 2, 4) = 4 per class held out of 8
    assert metrics["train_images"] == 3 * 4


def test_fit_prints_accuracies_and_calibration(folders, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["fit", str(folders / "train"), "--val", str(folders / "val"), "--model", "shapes", "--method",
                 "linear-probe", "--out", str(out), "--templates", "shapes", "--device", "cpu", "-q"]) == 0
    text = capsys.readouterr().out
    assert "validation accuracy (9 images, used for nothing else): zero-shot" in text and "-> linear-probe" in text
    assert "chosen: C=" in text and "cross-validation on the training images" in text
    assert "temperature" in text and "ECE" in text and f"fsclip predict IMAGES --adapter {out}" in text


def test_predict_follows_the_classify_json_lines_contract(adapter_dir, folders, capsys):
    assert main(["predict", str(folders / "test"), "--adapter", str(adapter_dir), "--format", "json", "--top-k",
                 "2", "--device", "cpu", "-q"]) == 0
    records = _records(capsys)
    assert len(records) == 12
    for rec in records:
        assert set(rec) == {"path", "label", "predictions"}
        assert rec["label"] in CLASSES and len(rec["predictions"]) == 2
        assert rec["predictions"][0]["label"] == rec["label"]
        assert rec["predictions"][0]["score"] >= rec["predictions"][1]["score"]


def test_threshold_abstains_and_bad_files_are_records(adapter_dir, folders, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    assert main(["predict", str(folders / "test" / "ring"), str(bad), "--adapter", str(adapter_dir), "--format",
                 "json", "--threshold", "0.999", "--device", "cpu", "-q"]) == 0
    records = _records(capsys)
    labelled = [r for r in records if "label" in r]
    assert any(r["label"] == "unknown" for r in labelled)
    assert all(r["label"] == "unknown" or r["predictions"][0]["score"] >= 0.999 for r in labelled)
    assert [r["path"] for r in records if "error" in r] == [str(bad)]


def test_auto_prints_its_plan_before_the_work_and_the_outcome_after(folders, tmp_path, capsys):
    assert main(["fit", str(folders / "train"), "--val", str(folders / "val"), "--model", "shapes", "--out",
                 str(tmp_path / "auto"), "--templates", "shapes", "--device", "cpu", "--budget", "10s"]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert err[0] == "fit: auto on 24 training images of 3 classes (9 validation images); budget 10s on cpu"
    assert "advisor: measurements (training images only):" in err
    assert any(line.startswith("advisor: zero-shot accuracy (training)") for line in err)
    chosen = next(i for i, line in enumerate(err) if line.startswith("advisor: method: "))
    assert err[chosen + 1].startswith("advisor: reason: ")
    plans = [i for i, line in enumerate(err) if "measured" in line and "ETA" in line]  # schedule, step time, ETA
    done = next(i for i, line in enumerate(err) if line.startswith("fit done in "))
    assert all(chosen < i < done for i in plans)
    assert "chosen by the strategy advisor on the training images" in captured.out
    assert "used for nothing else" in captured.out


def test_training_options_a_method_lacks_are_ignored_with_a_warning(folders, tmp_path, capsys):
    assert main(["fit", str(folders / "train"), "--val", str(folders / "val"), "--model", "shapes", "--method",
                 "linear-probe", "--batch-size", "8", "--iters", "3", "--out", str(tmp_path / "lp"), "--templates",
                 "shapes", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "--batch-size, --iters: not an option of method linear-probe; ignored" in err
    assert (tmp_path / "lp" / "adapter_config.json").exists()


def test_a_bad_budget_is_one_line_before_any_loading(folders, tmp_path, capsys):
    msg = _fit_fails([str(folders / "train"), "--method", "clap", "--budget", "5 minutes"], capsys, tmp_path / "o")
    assert "budget must be a duration like 90s, 5m, 2h" in msg and "'5 minutes'" in msg


def test_ctrl_c_ends_cleanly_with_exit_130_and_nothing_written(folders, tmp_path):
    """A real SIGINT to a real `fsclip fit` process, sent once it has printed its training plan."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "lora"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fsclip", "fit", str(folders / "train"), "--val",
                             str(folders / "val"), "--model", "shapes", "--method", "lora", "--iters", "100000",
                             "--out", str(out), "--templates", "shapes", "--device", "cpu"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            # a suite started in the background (`pytest &`) ignores SIGINT; its children inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if line.startswith("lora training:") or not line:
            break
    assert lines[-1].startswith("lora training: 100000 steps (as given"), lines
    proc.send_signal(signal.SIGINT)
    try:
        rest = proc.communicate(timeout=60)[1].splitlines()
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("fsclip fit did not stop within 60 s of SIGINT") from None
    assert proc.returncode == 130
    assert [line for line in rest if "interrupted" in line] == [f"fsclip: interrupted; nothing was written to {out}"]
    assert not any("Traceback" in line for line in rest)
    assert not out.exists() and not list(tmp_path.glob(".lora*"))


def test_lora_with_shots_seed_and_merge(folders, tmp_path, capsys):
    out, merged = tmp_path / "lora", tmp_path / "merged"
    assert main(["fit", str(folders / "train"), "--val", str(folders / "val"), "--model", "shapes", "--method",
                 "lora", "--shots", "2", "--seed", "3", "--iters", "2", "--lr", "1e-3", "--batch-size", "4",
                 "--no-flip", "--out", str(out), "--merge", str(merged), "--templates", "shapes", "--device", "cpu",
                 "-q"]) == 0
    header = json.loads((out / "adapter_config.json").read_text())
    assert header["config"]["flip"] is False and header["config"]["iters"] == 2 and header["config"]["seed"] == 3
    assert json.loads((out / "metrics.json").read_text())["train_images"] == 6
    assert (merged / "open_clip_config.json").exists()
    capsys.readouterr()
    assert main(["predict", str(folders / "test" / "ring"), "--adapter", str(out), "--format", "json", "--top-k",
                 "3", "--device", "cpu", "-q"]) == 0
    adapted = {r["path"]: r["predictions"] for r in _records(capsys)}
    assert main(["classify", str(folders / "test" / "ring"), "--labels", ",".join(CLASSES), "--model", str(merged),
                 "--templates", "shapes", "--format", "json", "--top-k", "3", "--device", "cpu", "-q"]) == 0
    merged_records = {r["path"]: r["predictions"] for r in _records(capsys)}
    assert len(adapted) == 4 and adapted.keys() == merged_records.keys()
    for path, preds in adapted.items():  # same ranking; scores differ only by the adapter's temperature
        assert [p["label"] for p in preds] == [p["label"] for p in merged_records[path]]


def _fit_fails(args, capsys, out) -> str:
    assert main(["fit", *args, "--model", "shapes", "--out", str(out), "--device", "cpu", "-q"]) == 2
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))  # no temp folder left behind either
    return _error(capsys)


def test_class_with_no_images(folders, tmp_path, capsys):
    train = tmp_path / "train"
    shutil.copytree(folders / "train", train)
    (train / "hexagon").mkdir()
    assert "no images in" in _fit_fails([str(train), "--method", "linear-probe"], capsys, tmp_path / "out")


def test_one_image_class_needs_a_validation_folder(folders, tmp_path, capsys):
    train = tmp_path / "train"
    shutil.copytree(folders / "train", train)
    for extra in sorted((train / "ring").iterdir())[1:]:
        extra.unlink()
    msg = _fit_fails([str(train), "--method", "linear-probe"], capsys, tmp_path / "out")
    assert "'ring' has 1 image(s)" in msg and "--val" in msg


def test_unreadable_training_image(folders, tmp_path, capsys):
    train = tmp_path / "train"
    shutil.copytree(folders / "train", train)
    (train / "circle" / "zz-broken.png").write_bytes(b"\x89PNG broken")
    msg = _fit_fails([str(train), "--val", str(folders / "val"), "--method", "tip-adapter"], capsys, tmp_path / "out")
    assert "cannot read 1 training image(s)" in msg and "zz-broken.png" in msg
    # without -q: the plan line, then the refusal; never a "skipping" warning for a file that is refused
    args = [str(train), "--val", str(folders / "val"), "--method", "tip-adapter", "--model", "shapes", "--device", "cpu"]
    assert main(["fit", *args, "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == msg and not any("skipping" in line for line in err), err


def test_validation_labels_differ(folders, tmp_path, capsys):
    val = tmp_path / "val"
    shutil.copytree(folders / "val", val)
    (val / "ring").rename(val / "torus")
    msg = _fit_fails([str(folders / "train"), "--val", str(val), "--method", "tip-adapter"], capsys, tmp_path / "o")
    assert "differ from training" in msg and "torus" in msg


def test_unknown_method_lists_valid_ones(folders, tmp_path, capsys):
    msg = _fit_fails([str(folders / "train"), "--method", "lorra"], capsys, tmp_path / "out")
    assert "unknown method 'lorra'; choose one of: auto, clap, coop, full-ft, linear-probe, lora" in msg


def test_existing_out_is_not_overwritten(folders, adapter_dir, capsys):
    before = (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert main(["fit", str(folders / "train"), "--model", "shapes", "--method", "linear-probe", "--out",
                 str(adapter_dir), "--device", "cpu", "-q"]) == 2
    assert "already exists" in _error(capsys) and (adapter_dir / "adapter_model.safetensors").read_bytes() == before


def test_overwrite_replaces_an_adapter_folder(folders, adapter_dir, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(adapter_dir, out)
    assert main(["fit", str(folders / "train"), "--model", "shapes", "--method", "linear-probe", "--out", str(out),
                 "--overwrite", "--templates", "shapes", "--device", "cpu", "-q"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["method"] == "linear-probe"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temp or .old folder left


def test_adapter_on_another_base_model_is_refused(adapter_dir, folders, tiny_openclip_dir, capsys):
    assert main(["predict", str(folders / "test"), "--adapter", str(adapter_dir), "--model", str(tiny_openclip_dir),
                 "--device", "cpu", "-q"]) == 2
    msg = _error(capsys)
    assert "fitted on model 'shapes'" in msg and "fingerprint" in msg


def test_predict_on_a_folder_that_is_not_an_adapter(folders, capsys):
    assert main(["predict", str(folders / "test"), "--adapter", str(folders / "train"), "--device", "cpu", "-q"]) == 2
    assert "not an fsclip adapter folder" in _error(capsys)
