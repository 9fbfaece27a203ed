"""The export cache: reuse, re-gating, rebuilding, recorded failures; and the one-line errors around it."""

from __future__ import annotations

import sys

import pytest
import torch

from fsclip.backends import load_model
from fsclip.runtime import apply_runtime, cache
from fsclip.runtime.export import IMAGE_FILE, TEXT_FILE, ExportError

EXPORTED = "exporting the"


def _stats(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_second_load_exports_nothing(shapes_onnx, caplog):
    before = _stats(shapes_onnx.folder)
    with caplog.at_level("INFO", logger="fsclip.runtime"):
        again = load_model("shapes", runtime="onnx")
    assert not [r for r in caplog.records if EXPORTED in r.message or "gate" in r.message]
    assert _stats(again.folder) == before and again.gate == shapes_onnx.gate


@pytest.mark.parametrize("damage", ["missing", "torn"])
def test_missing_or_damaged_gate_record_is_gated_again_without_export(tiny_onnx, caplog, damage):
    folder = tiny_onnx.folder
    models = {k: v for k, v in _stats(folder).items() if k.endswith(".onnx")}
    if damage == "missing":
        (folder / cache.GATES).unlink()
    else:
        (folder / cache.GATES).write_text('{"gate": {"runtime": "onnx", "pass')
    with caplog.at_level("INFO", logger="fsclip.runtime"):
        again = apply_runtime(tiny_onnx.base, "onnx")
    assert (folder / cache.GATES).is_file() and again.gate["passed"]
    assert {k: v for k, v in _stats(folder).items() if k.endswith(".onnx")} == models
    assert not [r for r in caplog.records if EXPORTED in r.message]
    assert [r for r in caplog.records if "gate passed" in r.message]


def test_damaged_model_is_built_again(shapes_int8, caplog):
    folder = shapes_int8.folder
    with open(folder / TEXT_FILE, "r+b") as f:  # a torn write: the file is shorter than recorded
        f.truncate(f.seek(0, 2) // 2)
    with caplog.at_level("INFO", logger="fsclip.runtime"):
        again = apply_runtime(shapes_int8.base, "onnx-int8")
    assert [r for r in caplog.records if "damaged" in r.message]
    assert [r for r in caplog.records if "quantised text.onnx" in r.message]  # from the cached fp32 export
    assert not [r for r in caplog.records if EXPORTED in r.message]
    assert again.gate["passed"] and (folder / cache.GATES).is_file()
    texts = ["a photo of a red circle.", "a blue star"]
    cos = torch.nn.functional.cosine_similarity(again.encode_texts(texts), shapes_int8.base.encode_texts(texts))
    assert cos.min() >= 0.99


@torch.library.custom_op("fsclip_test::no_onnx", mutates_args=())
def _no_onnx(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_no_onnx.register_fake
def _(x):
    return torch.empty_like(x)


class _Unexportable(torch.nn.Module):
    def forward(self, x):
        return _no_onnx(x)


def test_same_weights_other_configuration_gets_its_own_export(tiny_onnx, tiny_openclip_dir, tmp_path):
    import json
    import shutil

    cfg = json.loads((tiny_openclip_dir / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"].update(pool_type="last", no_causal_mask=True)  # same weights, other graph
    shutil.copy(tiny_openclip_dir / "open_clip_model.safetensors", tmp_path)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    other = load_model(str(tmp_path), runtime="onnx")
    assert other.fingerprint == tiny_onnx.fingerprint and other.folder != tiny_onnx.folder
    assert not other.exact_short_text and other.gate["passed"]
    texts = ["a photo of a cat.", "dog"]
    assert (other.encode_texts(texts) - other.base.encode_texts(texts)).abs().max() <= 1e-5


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        return x + 1 if x.sum() > 0 else x - 1  # control flow on values: torch.export cannot capture it


def test_uncapturable_model_names_the_layer(tiny_openclip_dir):
    backend = load_model(str(tiny_openclip_dir), device="cpu")
    backend.model.visual.ln_post = _DataDependent()
    with pytest.raises(ExportError) as err:
        apply_runtime(backend, "onnx")
    message = str(err.value)
    assert "\n" not in message and message.startswith("cannot capture the image tower for ONNX")
    assert message.endswith("(layer visual.ln_post)")


def test_unexportable_model_names_op_and_layer_and_auto_falls_back(tiny_openclip_dir, caplog):
    backend = load_model(str(tiny_openclip_dir), device="cpu")
    backend.model.visual.ln_post = _Unexportable()  # its weights are gone, so it is another model
    with pytest.raises(ExportError) as err:
        apply_runtime(backend, "onnx")
    message = str(err.value)
    assert "\n" not in message
    assert "fsclip_test.no_onnx" in message and "visual.ln_post" in message
    with caplog.at_level("INFO", logger="fsclip.runtime"):
        chosen = apply_runtime(backend, "auto")
    assert chosen is backend  # torch
    assert any("runtime auto: torch" in r.message and "no_onnx" in r.message for r in caplog.records)
    assert not [r for r in caplog.records if EXPORTED in r.message]  # the failure was recorded


def test_missing_packages_give_the_install_command(monkeypatch, tmp_path, capsys):
    from PIL import Image

    from fsclip.cli import main

    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code = main(["classify", str(tmp_path), "--model", "shapes", "--labels", "a,b", "--runtime", "onnx-int8", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "onnxruntime is missing" in err and "pip install 'fsclip[onnx]'" in err


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"runtime": "onx"}, "unknown runtime 'onx'; choose one of: torch, onnx, onnx-int8, auto"),
    ({"runtime": "onnx", "dtype": "bf16"}, "runtime onnx runs fp32 on the CPU"),
])
def test_bad_runtime_requests(kwargs, message):
    from fsclip.errors import UsageError

    with pytest.raises(UsageError, match=message):
        load_model("shapes", **kwargs)


def test_sessions_follow_torch_threads(shapes_onnx):
    from fsclip.runtime.session import get_session

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = get_session(shapes_onnx.folder / IMAGE_FILE)
        torch.set_num_threads(1)
        one = get_session(shapes_onnx.folder / IMAGE_FILE)
        assert one is get_session(shapes_onnx.folder / IMAGE_FILE)  # cached per process
    finally:
        torch.set_num_threads(before)
    assert two.get_session_options().intra_op_num_threads == 2
    assert one.get_session_options().intra_op_num_threads == 1


def test_cli_runtime_choices_are_the_runtimes():
    from fsclip.cli._common import RUNTIMES as CLI
    from fsclip.runtime import RUNTIMES

    assert CLI == RUNTIMES
