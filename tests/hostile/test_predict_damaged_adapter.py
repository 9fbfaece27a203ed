"""`fsclip predict` with adapter folders that were damaged, hand-edited or mistaken (issue 9, item 14)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fsclip.cli import main
from fsclip.shapes import write_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ("circle", "ring", "star")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path]:
    """(a tip-adapter folder fitted on the shapes model, a folder of test images)."""
    root = tmp_path_factory.mktemp("hostile-adapter")
    write_folder(root / "train", {s: [("red", s), ("blue", s)] for s in CLASSES}, 4, seed=0, size=48)
    write_folder(root / "test", {s: [("green", s)] for s in CLASSES}, 1, seed=1, size=48)
    assert main(["fit", str(root / "train"), "--model", "shapes", "--method", "tip-adapter", "--templates",
                 "shapes", "--out", str(root / "adapter"), "--device", "cpu", "-q"]) == 0
    return root / "adapter", root / "test"


@pytest.fixture
def adapter(fitted, tmp_path) -> Path:
    copy = tmp_path / "adapter"
    shutil.copytree(fitted[0], copy)
    return copy


def _predict(capsys, adapter: Path, images: Path) -> tuple[int, str, list[str]]:
    code = main(["predict", str(images), "--adapter", str(adapter), "--format", "json", "--device", "cpu", "-q"])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def _refused(capsys, adapter: Path, images: Path) -> str:
    code, out, err = _predict(capsys, adapter, images)
    assert code == 2 and out == "", out
    assert len(err) == 1 and err[0].startswith("fsclip: error:"), err
    return err[0]


def _edit_config(adapter: Path, edit) -> None:
    file = adapter / "adapter_config.json"
    header = json.loads(file.read_text())
    edit(header)
    file.write_text(json.dumps(header))


def test_user_predicts_with_a_truncated_weights_file(adapter, fitted, capsys):
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    msg = _refused(capsys, adapter, fitted[1])
    assert "adapter_model.safetensors is damaged" in msg


@pytest.mark.parametrize("edit", ["drop", "add", "rename-duplicate"])
def test_user_edits_the_class_list(adapter, fitted, capsys, edit):
    def change(header):
        if edit == "drop":
            header["classes"] = header["classes"][:2]
        elif edit == "add":
            header["classes"].append("hexagon")
        else:
            header["classes"][1] = header["classes"][0]
    _edit_config(adapter, change)
    msg = _refused(capsys, adapter, fitted[1])
    assert "adapter_config.json" in msg and ("classes" in msg)


def test_user_predicts_with_a_corrupt_metrics_file(adapter, fitted, capsys):
    (adapter / "metrics.json").write_text('{"val_accuracy": {"zero_sh')
    code, out, err = _predict(capsys, adapter, fitted[1])
    assert code == 0, err
    assert {json.loads(line)["label"] for line in out.splitlines()} <= set(CLASSES)


@pytest.mark.parametrize("key", ["fingerprint", "spec", "dtype"])
def test_user_predicts_with_a_base_model_key_missing(adapter, fitted, capsys, key):
    _edit_config(adapter, lambda h: h["base_model"].pop(key))
    msg = _refused(capsys, adapter, fitted[1])
    assert "adapter_config.json" in msg and f"base_model.{key}" in msg


@pytest.mark.parametrize("fmt", ["1.5", '"two"', "0", "null"])
def test_user_predicts_with_an_unknown_format(adapter, fitted, capsys, fmt):
    _edit_config(adapter, lambda h: h.update(format=json.loads(fmt)))
    assert "unknown format" in _refused(capsys, adapter, fitted[1])


def test_user_points_adapter_at_a_file(adapter, fitted, capsys):
    msg = _refused(capsys, adapter / "adapter_model.safetensors", fitted[1])
    assert "is a file" in msg


@pytest.mark.parametrize("temperature", ["0", "-1.5", "NaN", "Infinity", '"hot"'])
def test_user_edits_the_temperature(adapter, fitted, capsys, temperature):
    text = (adapter / "adapter_config.json").read_text()
    header = json.loads(text)
    old = json.dumps(header["state"]["temperature"])
    (adapter / "adapter_config.json").write_text(text.replace(f'"temperature": {old}', f'"temperature": {temperature}'))
    msg = _refused(capsys, adapter, fitted[1])
    assert "temperature must be a finite number > 0" in msg


def test_user_predicts_with_weights_holding_nan(adapter, fitted, capsys):
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["keys"][0, 0] = float("nan")
    save_file(tensors, weights)
    code, out, err = _predict(capsys, adapter, fitted[1])
    assert code != 0 and "NaN" not in out
    assert len(err) == 1 and "NaN" in err[0] and "adapter_model.safetensors" in err[0]


def test_fit_never_records_a_nan_temperature():
    from fsclip.adapters._calibration import fit_temperature
    from fsclip.errors import AdapterError

    logits = torch.tensor([[1.0, float("nan")], [0.5, 0.2]])
    with pytest.raises(AdapterError, match="NaN or infinite logits"):
        fit_temperature(logits, torch.tensor([0, 1]))
