"""Every registered adapter honours the same contract: fit / predict_proba / save / load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fsclip._version import __version__
from fsclip.adapters import fit, list_adapters, load_adapter
from fsclip.adapters.base import CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE
from fsclip.errors import AdapterError


@pytest.fixture(scope="module", params=list_adapters())
def fitted(request, tiny_openclip, small_task, fast_options):
    method = request.param
    before = tiny_openclip.encode_images(torch.zeros(2, 3, 32, 32))
    adapter = fit(tiny_openclip, small_task.pool, method, val=small_task.val, templates="generic", **fast_options.get(method, {}))
    after = tiny_openclip.encode_images(torch.zeros(2, 3, 32, 32))
    return adapter, torch.equal(before, after)


def test_fit_never_modifies_the_base_model(fitted):
    _, unchanged = fitted
    assert unchanged


def test_predict_proba_is_a_distribution_per_image(fitted, small_task):
    adapter, _ = fitted
    probs = adapter.predict_proba(small_task.test.paths)
    assert probs.shape == (len(small_task.test), 3)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(len(probs)))
    assert adapter.classes == ("circle", "ring", "square")


def test_predict_proba_takes_pil_images_too(fitted, small_task):
    from PIL import Image

    adapter, _ = fitted
    paths = small_task.test.paths[:3]
    images = [Image.open(p).convert("RGB") for p in paths]
    torch.testing.assert_close(adapter.predict_proba(images), adapter.predict_proba(paths))


def test_save_load_gives_identical_predictions(fitted, small_task, tiny_openclip, tmp_path):
    adapter, _ = fitted
    out = adapter.save(tmp_path / "adapter")
    loaded = load_adapter(out, backend=tiny_openclip)
    assert type(loaded) is type(adapter) and loaded.config == adapter.config
    assert loaded.temperature == adapter.temperature and loaded.classes == adapter.classes
    assert torch.equal(loaded.predict_proba(small_task.test.paths), adapter.predict_proba(small_task.test.paths))


def test_saved_folder_is_config_json_next_to_safetensors(fitted, tmp_path, tiny_openclip):
    adapter, _ = fitted
    out = adapter.save(tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE])
    header = json.loads((out / CONFIG_FILE).read_text())
    assert header["method"] == adapter.name and header["fsclip_version"] == __version__
    assert header["base_model"]["fingerprint"] == tiny_openclip.fingerprint
    assert header["config"]["templates"] == "generic"
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert set(metrics["val_accuracy"]) == {"zero_shot", "adapter"}
    weights = load_file(out / WEIGHTS_FILE)
    base_params = sum(p.numel() for p in tiny_openclip.model.parameters())
    # only what the method learned is saved; full-ft's image tower is the one exception that is large
    assert sum(t.numel() for t in weights.values()) < base_params


def test_loading_onto_another_model_is_refused(fitted, tmp_path, tiny_hf_clip):
    adapter, _ = fitted
    out = adapter.save(tmp_path / "adapter")
    with pytest.raises(AdapterError, match="fingerprint"):
        load_adapter(out, backend=tiny_hf_clip)


def test_load_without_backend_uses_the_recorded_spec(fitted, small_task, tmp_path):
    adapter, _ = fitted
    out = adapter.save(tmp_path / "adapter")
    loaded = load_adapter(out, device="cpu")
    assert loaded.base.fingerprint == adapter.base.fingerprint
    assert torch.equal(loaded.predict_proba(small_task.test.paths[:2]), adapter.predict_proba(small_task.test.paths[:2]))
