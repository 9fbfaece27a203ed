"""LoRA through PEFT on both backends; adapter-only weights; merged model == base + adapter."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from fsclip.adapters import fit, load_adapter
from fsclip.adapters._features import encode_items
from fsclip.adapters.base import WEIGHTS_FILE
from fsclip.backends import load_model
from fsclip.prompts_io import load_templates
from fsclip.zeroshot import build_text_classifier


def _lora_modules(adapter) -> list[str]:
    return [n for n, m in adapter.backend.model.named_modules() if isinstance(m, LoraLayer)]


@pytest.fixture(scope="module")
def lora_openclip(tiny_openclip, small_task):
    # random weights: validation cannot improve; keep the last step, after a learning rate that moves them
    return fit(tiny_openclip, small_task.pool, "lora", val=small_task.val, templates="generic", iters=6, lr=5e-2,
               keep_best=False)


@pytest.fixture(scope="module")
def lora_hf(tiny_hf_clip, small_task):
    return fit(tiny_hf_clip, small_task.pool, "lora", val=small_task.val, templates="generic", iters=6, lr=5e-2,
               keep_best=False)


def test_openclip_fused_attention_of_both_towers_is_wrapped(lora_openclip, tiny_openclip):
    names = lora_openclip.targets
    assert names == ["visual.transformer.resblocks.0.attn", "visual.transformer.resblocks.1.attn",
                     "transformer.resblocks.0.attn", "transformer.resblocks.1.attn"]
    wrapped = _lora_modules(lora_openclip)
    assert any(n.startswith("visual.") for n in wrapped) and any(n.startswith("transformer.") for n in wrapped)
    assert not any(isinstance(m, LoraLayer) for m in tiny_openclip.model.modules())  # base untouched


def test_transformers_q_k_v_of_both_towers_are_wrapped(lora_hf):
    names = lora_hf.targets
    assert len(names) == 2 * 2 * 3  # towers x layers x (q, k, v)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj"}
    assert any(n.startswith("vision_model.") for n in names) and any(n.startswith("text_model.") for n in names)


def test_image_tower_only(tiny_openclip, small_task):
    adapter = fit(tiny_openclip, small_task.pool, "lora", val=small_task.val, templates="generic", iters=2,
                  towers="image")
    assert adapter.targets and all(n.startswith("visual.") for n in adapter.targets)


@pytest.mark.parametrize("which", ["lora_openclip", "lora_hf"])
def test_only_adapter_weights_are_saved(which, request, tmp_path):
    adapter = request.getfixturevalue(which)
    weights = load_file(adapter.save(tmp_path / "a") / WEIGHTS_FILE)
    assert set(weights) - {"text"} and all(k.startswith("lora.") and "lora_" in k for k in set(weights) - {"text"})
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # training moved B off zero


@pytest.mark.parametrize("which", ["lora_openclip", "lora_hf"])
def test_merged_model_gives_the_same_logits_as_base_plus_adapter(which, request, small_task, tmp_path):
    adapter = request.getfixturevalue(which)
    merged_dir = adapter.merge(tmp_path / "merged")
    merged = load_model(str(merged_dir), device="cpu")
    assert merged.fingerprint != adapter.base.fingerprint
    paths = small_task.test.paths
    ours = adapter.logits_from_features(adapter.encode(paths))
    text = build_text_classifier(merged, adapter.classes, load_templates(adapter.config.templates))
    theirs = merged.logit_scale * encode_items(merged, paths, cache=False) @ text.T
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    base = load_model(adapter.base.spec, device="cpu")
    zero_shot = base.logit_scale * encode_items(base, paths, cache=False) @ build_text_classifier(
        base, adapter.classes, load_templates(adapter.config.templates)).T
    assert (zero_shot - ours).abs().max() > 1e-2  # the merge is not trivially the base model


def test_save_load_round_trip_on_transformers(lora_hf, tiny_hf_clip, small_task, tmp_path):
    loaded = load_adapter(lora_hf.save(tmp_path / "a"), backend=tiny_hf_clip)
    assert torch.equal(loaded.predict_proba(small_task.test.paths), lora_hf.predict_proba(small_task.test.paths))
