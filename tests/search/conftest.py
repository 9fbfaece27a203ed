"""Search fixtures: the tiny random model as a loaded backend."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_backend(tiny_openclip_dir):
    from fsclip.backends import load_model

    return load_model(str(tiny_openclip_dir), device="cpu")
