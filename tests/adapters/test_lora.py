"""LoRA through PEFT on both backends: separate q, k, v updates with dropout, CLIP-LoRA's layout;
adapter-only weights; merged model == base + adapter; towers without attention are refused."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from fsclip.adapters import fit, load_adapter
from fsclip.adapters._features import encode_items
from fsclip.adapters.base import WEIGHTS_FILE
from fsclip.backends import load_model
from fsclip.backends.openclip import SplitQKVAttention
from fsclip.errors import AdapterError
from fsclip.prompts_io import load_templates
from fsclip.zeroshot import build_text_classifier


def _lora_modules(adapter) -> list[str]:
    return [n for n, m in adapter.backend.model.named_modules() if isinstance(m, LoraLayer)]


@pytest.fixture(scope="module")
def lora_openclip(tiny_openclip, small_task):
    # random weights: move them with a large learning rate; the last step's weights are kept (the default)
    return fit(tiny_openclip, small_task.pool, "lora", val=small_task.val, templates="generic", iters=6, lr=5e-2)


@pytest.fixture(scope="module")
def lora_hf(tiny_hf_clip, small_task):
    return fit(tiny_hf_clip, small_task.pool, "lora", val=small_task.val, templates="generic", iters=6, lr=5e-2)


def test_openclip_q_k_v_of_both_towers_are_wrapped_not_out_proj(lora_openclip, tiny_openclip):
    names = lora_openclip.targets
    blocks = [f"{tower}transformer.resblocks.{i}.attn" for tower in ("visual.", "") for i in range(2)]
    assert names == [f"{b}.{p}" for b in blocks for p in ("q_proj", "k_proj", "v_proj")]
    wrapped = _lora_modules(lora_openclip)
    assert not any("out_proj" in n for n in wrapped)
    assert not any(isinstance(m, (LoraLayer, SplitQKVAttention)) for m in tiny_openclip.model.modules())  # base untouched


def test_transformers_q_k_v_of_both_towers_are_wrapped(lora_hf):
    names = lora_hf.targets
    assert len(names) == 2 * 2 * 3  # towers x layers x (q, k, v)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj"}
    assert any(n.startswith("vision_model.") for n in names) and any(n.startswith("text_model.") for n in names)


def test_image_tower_only(tiny_openclip, small_task):
    adapter = fit(tiny_openclip, small_task.pool, "lora", val=small_task.val, templates="generic", iters=2,
                  towers="image")
    assert adapter.targets and all(n.startswith("visual.") for n in adapter.targets)


def _mha(dim: int = 32, heads: int = 2) -> torch.nn.MultiheadAttention:
    torch.manual_seed(1)
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_bias.normal_()  # nonzero biases: the split must carry them too
        mha.out_proj.bias.normal_()
    return mha.eval()


@pytest.mark.parametrize("causal", [False, True])
def test_split_attention_is_numerically_the_fused_one(causal):
    mha = _mha()
    x = torch.randn(3, 7, 32)
    mask = torch.full((7, 7), float("-inf")).triu(1) if causal else None  # open_clip's text mask
    want = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    split = SplitQKVAttention(mha).eval()
    torch.testing.assert_close(split(x, x, x, need_weights=False, attn_mask=mask)[0], want, atol=1e-6, rtol=1e-5)
    fused = split.fused()
    torch.testing.assert_close(fused(x, x, x, need_weights=False, attn_mask=mask)[0], want, atol=1e-6, rtol=1e-5)


def test_lora_on_split_open_clip_attention_matches_transformers_clip_attention():
    """Parity: the same weights and the same low-rank q, k, v updates give the same output in open_clip's
    split attention and in transformers' CLIPAttention, which has separate q, k, v projections natively."""
    import peft
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPAttention

    split = SplitQKVAttention(_mha())
    theirs = CLIPAttention(CLIPVisionConfig(hidden_size=32, num_attention_heads=2)).eval()
    theirs.load_state_dict(split.state_dict())  # same names: q_proj, k_proj, v_proj, out_proj
    config = dict(r=2, lora_alpha=1, lora_dropout=0.25, target_modules=["q_proj", "k_proj", "v_proj"])
    ours_p = peft.get_peft_model(torch.nn.Sequential(split), peft.LoraConfig(**config))
    theirs_p = peft.get_peft_model(torch.nn.Sequential(theirs), peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(0)
    ours_lora = {n.split("0.", 1)[1]: p for n, p in ours_p.named_parameters() if "lora_" in n}
    theirs_lora = {n.split("0.", 1)[1]: p for n, p in theirs_p.named_parameters() if "lora_" in n}
    assert sorted(ours_lora) == sorted(theirs_lora) and len(ours_lora) == 6  # A and B of q, k, v
    with torch.no_grad():
        for name, p in ours_lora.items():
            p.copy_(torch.randn(p.shape, generator=g))
            theirs_lora[name].copy_(p)
    ours_p.eval(), theirs_p.eval()  # PEFT leaves models in training mode: LoRA dropout would act
    x = torch.randn(2, 5, 32)
    ours_out = ours_p.base_model.model[0](x, x, x)[0]
    theirs_out = theirs_p.base_model.model[0](x)[0]
    torch.testing.assert_close(ours_out, theirs_out, atol=1e-5, rtol=1e-5)
    assert (ours_out - split.fused()(x, x, x, need_weights=False)[0]).abs().max() > 1e-3  # the update does act


def test_lora_dropout_acts_in_training_only(tiny_openclip):
    """CLIP-LoRA's dropout 0.25 on each update's input: in training mode two passes differ, in eval they agree."""
    import peft

    split = SplitQKVAttention(_mha())
    model = peft.get_peft_model(torch.nn.Sequential(split), peft.LoraConfig(
        r=2, lora_alpha=1, lora_dropout=0.25, target_modules=["q_proj", "k_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # B starts at zero, which would hide the dropout
    x = torch.randn(2, 5, 32)
    attn = model.base_model.model[0]
    model.train()
    assert not torch.allclose(attn(x, x, x)[0], attn(x, x, x)[0])
    model.eval()
    torch.testing.assert_close(attn(x, x, x)[0], attn(x, x, x)[0])


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


def test_resnet_image_tower_is_refused_in_one_line_not_silently_skipped(tiny_resnet, small_task):
    with pytest.raises(AdapterError) as err:
        fit(tiny_resnet, small_task.pool, "lora", val=small_task.val, templates="generic", iters=1)
    msg = str(err.value)
    assert "image tower" in msg and "ModifiedResNet" in msg and "towers='text'" in msg and "\n" not in msg


def test_resnet_text_tower_only_works(tiny_resnet, small_task):
    adapter = fit(tiny_resnet, small_task.pool, "lora", val=small_task.val, templates="generic", iters=2,
                  towers="text")
    assert adapter.targets and not any(n.startswith("visual.") for n in adapter.targets)
