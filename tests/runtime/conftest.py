"""Exported runtimes, built once per session (each export takes seconds), and one torch thread per module."""

from __future__ import annotations

import pytest

for _module in ("onnx", "onnxruntime", "onnxscript"):  # the 'onnx' extra (make test installs it)
    pytest.importorskip(_module)

from fsclip.backends import load_model  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every module here runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def shapes_onnx():
    return load_model("shapes", runtime="onnx")


@pytest.fixture(scope="session")
def shapes_int8():
    return load_model("shapes", runtime="onnx-int8")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_openclip_dir):
    return load_model(str(tiny_openclip_dir), runtime="onnx")


@pytest.fixture(scope="session")
def hf_clip_onnx(tiny_hf_clip_dir):
    return load_model(f"hf:{tiny_hf_clip_dir}", runtime="onnx")


@pytest.fixture(scope="session")
def hf_siglip_onnx(tiny_hf_siglip_dir):
    return load_model(f"hf:{tiny_hf_siglip_dir}", runtime="onnx")
