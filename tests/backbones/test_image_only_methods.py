"""Every method that runs without a text tower honours the adapter contract on a tiny timm CNN and ViT,
and does what its docstring says there (head swap, nearest class mean, stages and batch norm, LoRA targets)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from fsclip.adapters import fit, load_adapter, runnable_methods
from fsclip.adapters.base import CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE
from fsclip.adapters.prototype import cl2n
from fsclip.errors import AdapterError

IMAGE_ONLY = ["full-ft", "linear-probe", "lora", "partial-ft", "prototype", "scratch"]
FAST = {"lora": {"iters": 4}, "partial-ft": {"iters": 4, "blocks": 1}, "full-ft": {"iters": 4},
        "scratch": {"iters": 4}}
WHOLE_TOWER = ("full-ft", "scratch")  # the methods whose saved weights are the whole image tower


def _encode(backend) -> torch.Tensor:
    pixels = torch.rand(2, 3, backend.image_size, backend.image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return backend.encode_images(pixels)


@pytest.fixture(scope="module", params=["tiny_cnn", "tiny_vit"])
def backbone(request):
    return request.param, request.getfixturevalue(request.param)


@pytest.fixture(scope="module", params=IMAGE_ONLY)
def fitted(request, backbone, tiny_task):
    name, backend = backbone
    train, val, _ = tiny_task
    before = _encode(backend)
    adapter = fit(backend, train, request.param, val=val, **FAST.get(request.param, {}))
    return name, backend, adapter, torch.equal(before, _encode(backend))


def test_the_image_only_methods_are_the_runnable_ones(tiny_cnn, tiny_vit):
    assert runnable_methods(tiny_cnn) == IMAGE_ONLY and runnable_methods(tiny_vit) == IMAGE_ONLY


def test_fit_never_modifies_the_base_model(fitted):
    assert fitted[3]


def test_predicts_the_task_classes_not_the_checkpoints(fitted, tiny_task):
    _, _, adapter, _ = fitted
    test = tiny_task[2]
    probs = adapter.predict_proba(test.paths)
    assert adapter.classes == ("circle", "square", "star")  # the tiny CNN's own head says ant, bee, cat
    assert probs.shape == (len(test), 3) and torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(len(test)))


def test_metrics_have_no_zero_shot_figure(fitted):
    _, _, adapter, _ = fitted
    assert set(adapter.metrics["val_accuracy"]) == {"adapter"}
    assert adapter.metrics["method"] == adapter.name and adapter.metrics["advice"] is None


def test_save_load_round_trip(fitted, tiny_task, tmp_path):
    _, backend, adapter, _ = fitted
    paths = tiny_task[2].paths
    out = adapter.save(tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE])
    header = json.loads((out / CONFIG_FILE).read_text())
    assert header["method"] == adapter.name and header["base_model"]["fingerprint"] == backend.fingerprint
    assert "zero_shot" not in json.loads((out / METRICS_FILE).read_text())["val_accuracy"]
    expected = adapter.predict_proba(paths)
    for loaded in (load_adapter(out, backend=backend), load_adapter(out, device="cpu")):  # given, and by spec
        assert type(loaded) is type(adapter) and loaded.config == adapter.config
        assert torch.equal(loaded.predict_proba(paths), expected)
    saved = sum(t.numel() for t in load_file(out / WEIGHTS_FILE).values())
    base = sum(p.numel() for p in backend.model.parameters())
    if adapter.name not in WHOLE_TOWER:  # only what the method learned is saved
        assert saved < base


def test_linear_probe_is_a_head_swap_without_a_zero_shot_prior(tiny_cnn, tiny_task):
    train, val, test = tiny_task
    adapter = fit(tiny_cnn, train, "linear-probe", val=val)
    assert adapter.config.zero_shot_prior is False  # recorded as it ran
    assert adapter.weight.shape == (3, tiny_cnn.embed_dim) and adapter.c is not None
    assert "cross-validation on the training images" in adapter.selection["chosen by"]
    x = adapter.encode(test.paths)
    torch.testing.assert_close(adapter.logits_from_features(x), x @ adapter.weight.T + adapter.bias)


def test_prototype_is_the_nearest_centred_class_mean(tiny_cnn, tiny_task):
    train, val, test = tiny_task
    adapter = fit(tiny_cnn, train, "prototype", val=val)
    x_train, y_train = adapter.encode(train.paths), torch.tensor(train.targets)
    mean = x_train.mean(0)
    z = torch.nn.functional.normalize(x_train - mean, dim=-1)
    means = torch.stack([z[y_train == c].mean(0) for c in range(3)])  # brute force, class by class
    x = cl2n(adapter.encode(test.paths), mean)
    nearest = torch.cdist(x, means).argmin(1)
    assert torch.equal(adapter.predict_proba(test.paths).argmax(1), nearest)
    assert adapter.selection["chosen by"].startswith("nothing: training-free")


def _named(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("batch_norm", ["frozen", "train"])
def test_partial_ft_trains_the_last_stage_and_keeps_frozen_statistics(batch_norm, tiny_cnn, tiny_task):
    train, val, _ = tiny_task
    adapter = fit(tiny_cnn, train, "partial-ft", val=val, iters=3, blocks=1, batch_norm=batch_norm)
    before, after = _named(tiny_cnn.model), _named(adapter.backend.model)
    changed = {n for n in before if before[n].is_floating_point() and not torch.equal(before[n], after[n])}
    last = "layer4."  # resnet10t's stages are layer1-4; the stem is conv1/bn1
    assert changed and all(n.startswith(last) for n in changed), sorted(changed)[:5]
    stats = {n for n in changed if n.endswith(("running_mean", "running_var"))}
    assert bool(stats) == (batch_norm == "train")  # frozen stages never move; trained ones only with "train"
    assert adapter.train_result["blocks_trained"] == 1 and adapter.train_result["blocks"] == 4


def test_full_ft_rates_fall_from_the_head_down_to_the_stem(tiny_cnn, tiny_task):
    train, val, _ = tiny_task
    adapter = fit(tiny_cnn, train, "full-ft", val=val, iters=2)
    rates = adapter.train_result["learning_rates"]
    order = ["classifier", "projection", "block 3", "block 2", "block 1", "block 0", "stem"]
    assert [r for r in rates if r in order] == [r for r in order if r in rates] and "stem" in rates
    values = [rates[r] for r in order if r in rates]
    assert values == sorted(values, reverse=True) and values[0] > values[-1]
    assert adapter.config.gradual_unfreeze  # full-ft's default: the heads first, one more stage per epoch


def test_scratch_starts_from_random_weights(tiny_cnn, tiny_task):
    train, val, _ = tiny_task
    # seed 1: the tiny CNN itself is an untrained timm model drawn under seed 0
    adapter = fit(tiny_cnn, train, "scratch", val=val, iters=1, seed=1)
    stem = "conv1.0.weight"
    pretrained = dict(tiny_cnn.model.named_parameters())[stem]
    assert not torch.allclose(dict(adapter.backend.model.named_parameters())[stem], pretrained, atol=1e-2)
    assert "random" in adapter.selection["initialisation"]
    assert adapter.train_result["blocks_trained"] == adapter.train_result["blocks"]


def _tiny_hf_vit(tmp_path):
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).eval().save_pretrained(tmp_path)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    from fsclip.backends import load_model

    return load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize(("which", "layer", "suffixes"), [
    ("tiny_cnn", peft.tuners.lora.Conv2d, None),
    ("tiny_vit", peft.tuners.lora.Linear, {"qkv"}),
    ("hf_vit", peft.tuners.lora.Linear, {"q_proj", "k_proj", "v_proj"}),
])
def test_lora_targets_convolutions_or_attention_projections(which, layer, suffixes, request, tiny_task, tmp_path):
    backend = _tiny_hf_vit(tmp_path / "vit") if which == "hf_vit" else request.getfixturevalue(which)
    train, val, test = tiny_task
    adapter = fit(backend, train, "lora", val=val, iters=2)
    wrapped = {n: m for n, m in adapter.peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped and all(isinstance(m, layer) for m in wrapped.values())
    assert len(wrapped) == len(adapter.targets)
    if suffixes is None:  # every convolution of resnet10t's stages (layer1-4), none of the stem's
        stages = {n for n, m in backend.model.named_modules()
                  if isinstance(m, torch.nn.Conv2d) and n.startswith("layer")}
        assert {n.removeprefix("base_model.model.") for n in wrapped} == stages
    else:
        assert {n.rsplit(".", 1)[-1] for n in wrapped} == suffixes
    assert adapter.config.towers == "image" and adapter.head is not None
    out = adapter.save(tmp_path / "lora")
    keys = load_file(out / WEIGHTS_FILE).keys()
    assert {"head.weight", "head.bias"} <= set(keys) and all(k.startswith(("lora.", "head.")) for k in keys)
    assert torch.equal(load_adapter(out, backend=backend).predict_proba(test.paths), adapter.predict_proba(test.paths))


def test_lora_on_the_text_tower_of_an_image_only_model_is_one_line(tiny_cnn, tiny_task):
    train, val, _ = tiny_task
    with pytest.raises(AdapterError) as err:
        fit(tiny_cnn, train, "lora", val=val, towers="text", iters=1)
    assert "needs a text tower" in str(err.value) and "\n" not in str(err.value)
