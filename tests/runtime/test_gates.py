"""Accuracy gates: int8 passes on the shapes model; a broken quantisation is refused with its figures."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fsclip.runtime import RuntimeRefused, apply_runtime
from fsclip.runtime.export import IMAGE_FILE, TEXT_FILE
from fsclip.runtime.gates import INT8_MIN_COSINE, _shapes_renders, calibration_pixels, gate_labels, run_gates
from fsclip.runtime.ort_backend import OrtBackend
from fsclip.zeroshot import ZeroShotClassifier


def test_int8_gate_passes_on_the_shapes_model(shapes_int8):
    gate = shapes_int8.gate
    assert shapes_int8.runtime == "onnx-int8" and gate["passed"]
    # measured: cosine >= 0.9993 for both towers, top-1 agreement 100% (32 renders; 512 renders: same)
    assert min(gate["image_min_cosine"], gate["text_min_cosine"]) >= 0.998
    assert gate["top1_agreement"] == 1.0


def test_int8_zero_shot_agrees_with_torch_on_fresh_renders(shapes_int8):
    # renders the gate never saw, the shapes world's own 48-way task and prompts
    base = shapes_int8.base
    labels = gate_labels()[-48:]
    pixels = torch.stack([base.preprocess(im) for im in _shapes_renders(96, seed=7)])
    torch_pred = ZeroShotClassifier(base, labels, "shapes").predict_proba(base.encode_images(pixels)).argmax(1)
    int8 = ZeroShotClassifier(shapes_int8, labels, "shapes")
    int8_pred = int8.predict_proba(shapes_int8.encode_images(pixels)).argmax(1)
    # measured: 96 of 96 agree
    assert (torch_pred == int8_pred).float().mean() >= 0.99


def _mis_scale(path, factor: float) -> None:
    """A plausible quantiser bug: every int8 weight's scale off by `factor`."""
    model = onnx.load(path)
    for init in model.graph.initializer:
        if init.name.endswith("_scale") and numpy_helper.to_array(init).size == 1:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    onnx.save(model, path)


def test_gate_refuses_a_broken_quantisation(shapes_int8, tmp_path):
    for name in (IMAGE_FILE, TEXT_FILE):
        shutil.copy(shapes_int8.folder / name, tmp_path / name)
        _mis_scale(tmp_path / name, 1.1)
    broken = OrtBackend(shapes_int8.base, "onnx-int8", tmp_path)
    pixels, source = calibration_pixels(shapes_int8.base)
    gate = run_gates(shapes_int8.base, broken, "onnx-int8", pixels, source)
    # measured: image cosine 0.945, text 0.974, while top-1 still agreed on all 32 renders
    assert not gate.passed and gate.image_min_cosine < INT8_MIN_COSINE
    line = gate.figures()
    assert "\n" not in line and f"{gate.image_min_cosine:.4f}" in line and "limit 0.99" in line


def test_refusal_through_load_is_one_line_and_recorded(shapes_int8, tmp_path, monkeypatch, caplog):
    """The real path with a broken quantiser: export is reused, quantise, gate, refuse, record; auto falls back."""
    import fsclip.runtime.quantize as q
    from fsclip.runtime import cache

    monkeypatch.setenv("FSCLIP_CACHE", str(tmp_path))
    fp32 = cache.entry_dir(shapes_int8.base, "onnx")
    shutil.copytree(shapes_int8.folder.parent / fp32.name, fp32, dirs_exist_ok=True)  # no new export
    real = q.quantize

    def broken(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        _mis_scale(dst, 1.1)

    monkeypatch.setattr(q, "quantize", broken)
    with pytest.raises(RuntimeRefused) as err:
        apply_runtime(shapes_int8.base, "onnx-int8")
    message = str(err.value)
    assert "\n" not in message and "refused" in message and "cosine to torch" in message
    monkeypatch.setattr(q, "quantize", real)
    with pytest.raises(RuntimeRefused, match="gated once and recorded"):  # no re-gate: the record stands
        apply_runtime(shapes_int8.base, "onnx-int8")
    with caplog.at_level("WARNING", logger="fsclip.runtime"):
        chosen = apply_runtime(shapes_int8.base, "auto")
    assert chosen.runtime == "onnx"
    assert any("runtime auto: onnx" in r.message and "onnx-int8" in r.message for r in caplog.records)



def test_calibration_takes_your_images_first_and_reads_lazily(shapes_int8, tmp_path):
    import itertools

    from PIL import Image

    from fsclip.images import load_image

    base = shapes_int8.base
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for i, where in enumerate(["a.png", "b/c.png", ".hidden/d.png"]):
        Image.new("RGB", (70, 50), (40 * i, 200, 90)).save(tmp_path / where)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    pixels, source = calibration_pixels(base, [tmp_path], n=6)
    assert pixels.shape == (6, 3, 64, 64) and source == "2 of your images + 4 shapes-world renders"
    assert torch.equal(pixels[0], base.preprocess(load_image(tmp_path / "a.png")))
    # an endless source is read only as far as needed
    pixels, source = calibration_pixels(base, itertools.repeat(tmp_path / "a.png"), n=3)
    assert len(pixels) == 3 and source == "3 of your images"
