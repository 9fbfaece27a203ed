"""Search fixtures: the tiny random model as a loaded backend; one torch thread per search test module."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every module here runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_backend(tiny_openclip_dir):
    from fsclip.backends import load_model

    return load_model(str(tiny_openclip_dir), device="cpu")
