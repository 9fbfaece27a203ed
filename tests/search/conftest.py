"""Search fixtures: the tiny random model as a loaded backend; one torch thread per search test module."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The test models are tiny: splitting their small matmuls over threads only adds OpenMP barriers,
    which cost 10-100x when the CPUs are shared with other work. Restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_backend(tiny_openclip_dir):
    from fsclip.backends import load_model

    return load_model(str(tiny_openclip_dir), device="cpu")
