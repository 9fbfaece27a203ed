"""Weights fingerprints do not depend on the dtype the weights were loaded in (issue 9, items 20 and 24):
an adapter, index or cache made on a CPU (fp32) opens on a GPU (fp16)."""

from __future__ import annotations

import json

import pytest

from fsclip.backends import load_model
from fsclip.cli import main
from fsclip.shapes import write_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FSCLIP_CACHE", str(tmp_path / "cache"))  # no remembered fingerprint from other tests


def test_user_loads_the_shapes_model_in_bf16():
    # (fp16 kept the fingerprint already: the shapes checkpoint's values are all exact in fp16)
    fp32 = load_model("shapes", device="cpu").fingerprint
    assert load_model("shapes", device="cpu", dtype="bf16").fingerprint == fp32
    assert load_model("shapes", device="cpu", dtype="fp16").fingerprint == fp32


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("which", ["open_clip", "transformers"])
def test_user_loads_an_fp32_checkpoint_in_half_precision(tiny_openclip_dir, tiny_hf_clip_dir, which, dtype):
    folder = str(tiny_openclip_dir if which == "open_clip" else tiny_hf_clip_dir)
    half, full = load_model(folder, device="cpu", dtype=dtype), load_model(folder, device="cpu")
    assert half.fingerprint == full.fingerprint
    assert load_model(folder, device="cpu", dtype=dtype).fingerprint == full.fingerprint  # remembered, same


def test_user_predicts_in_bf16_with_an_adapter_fitted_in_fp32(tmp_path, capsys):
    write_folder(tmp_path / "train", {s: [("red", s), ("blue", s)] for s in ("circle", "ring")}, 4, seed=0, size=48)
    assert main(["fit", str(tmp_path / "train"), "--model", "shapes", "--method", "tip-adapter", "--templates",
                 "shapes", "--out", str(tmp_path / "adapter"), "--device", "cpu", "-q"]) == 0
    capsys.readouterr()
    for extra in (["--dtype", "bf16"], ["--dtype", "fp16", "--model", "shapes"]):
        code = main(["predict", str(tmp_path / "train" / "ring"), "--adapter", str(tmp_path / "adapter"),
                     "--format", "json", "--device", "cpu", "-q", *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert {json.loads(line)["label"] for line in out.splitlines()} <= {"circle", "ring"}
