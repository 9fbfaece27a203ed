"""Fine-tuning practice: which layers train, at which learning rates, in which order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fsclip.adapters import fit
from fsclip.adapters._augment import random_view
from fsclip.adapters._train import image_params


@pytest.mark.parametrize("which", ["tiny_openclip", "tiny_hf_clip"])
def test_image_parameters_split_into_stem_blocks_and_head(which, request):
    backend = request.getfixturevalue(which)
    parts = image_params(backend)
    assert len(parts.blocks) == 2
    stem, head = set(parts.stem), set(parts.head)
    if backend.name == "open_clip":
        assert stem == {"visual.class_embedding", "visual.positional_embedding", "visual.conv1.weight",
                        "visual.ln_pre.weight", "visual.ln_pre.bias"}
        assert head == {"visual.ln_post.weight", "visual.ln_post.bias", "visual.proj"}
    else:
        assert {"visual_projection.weight", "vision_model.post_layernorm.weight"} <= head
        assert any("embeddings" in n for n in stem) and not any("text_model" in n for n in stem | head)


def _changed(adapter, base) -> set[str]:
    ours = dict(adapter.backend.model.named_parameters())
    return {n for n, p in base.model.named_parameters() if not torch.equal(p, ours[n])}


def test_partial_ft_trains_only_the_last_blocks_and_head(tiny_openclip, small_task):
    adapter = fit(tiny_openclip, small_task.pool, "partial-ft", val=small_task.val, templates="generic", blocks=1,
                  iters=3, lr=1e-2, keep_best=False)
    changed = _changed(adapter, tiny_openclip)
    assert changed and all(n.startswith(("visual.transformer.resblocks.1.", "visual.ln_post", "visual.proj"))
                           for n in changed)
    assert set(adapter.trained) >= changed


def test_full_ft_uses_discriminative_learning_rates(tiny_openclip, small_task):
    adapter = fit(tiny_openclip, small_task.pool, "full-ft", val=small_task.val, templates="generic", iters=3,
                  lr=1e-3, head_lr=1e-2, layer_decay=0.5, keep_best=False, gradual_unfreeze=False)
    lrs = adapter.train_result["learning_rates"]
    assert list(lrs) == ["classifier", "projection", "block 1", "block 0", "stem"]
    assert lrs == pytest.approx({"classifier": 1e-2, "projection": 1e-3, "block 1": 5e-4, "block 0": 2.5e-4,
                                 "stem": 1.25e-4})
    assert any(n.startswith("visual.conv1") for n in _changed(adapter, tiny_openclip))
    assert not any(n.startswith(("transformer.", "token_embedding")) for n in _changed(adapter, tiny_openclip))


def test_gradual_unfreezing_starts_with_the_backbone_frozen(tiny_openclip, small_task):
    # one epoch: only the classifier and the projection head may move
    adapter = fit(tiny_openclip, small_task.pool, "full-ft", val=small_task.val, templates="generic", epochs=1,
                  batch_size=4, lr=1e-2, gradual_unfreeze=True, keep_best=False)
    changed = _changed(adapter, tiny_openclip)
    assert changed and all(n.startswith(("visual.ln_post", "visual.proj")) for n in changed)


def test_flip_is_optional_and_crops_keep_the_model_size():
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :20] = 255  # bright left third: a mirror image is bright on the right
    img = Image.fromarray(arr)
    rng = np.random.default_rng(0)
    never = [np.asarray(random_view(img, rng, 32, scale=1.0, flip=False)) for _ in range(20)]
    assert all(v.shape == (32, 32, 3) and v[:, :4].mean() > v[:, -4:].mean() for v in never)
    some = [np.asarray(random_view(img, rng, 32, scale=1.0, flip=True)) for _ in range(20)]
    assert any(v[:, :4].mean() < v[:, -4:].mean() for v in some)


@pytest.mark.parametrize("probe_init", [True, False])
def test_head_starts_from_the_linear_probe_or_zero_shot(probe_init, tiny_openclip, small_task):
    # lr 0 everywhere: the head the training started from is the one saved
    adapter = fit(tiny_openclip, small_task.pool, "partial-ft", val=small_task.val, templates="generic", iters=1,
                  lr=1e-12, head_lr=1e-12, probe_init=probe_init, calibrate=False)
    if probe_init:
        start = fit(tiny_openclip, small_task.pool, "linear-probe", val=small_task.val, templates="generic",
                    calibrate=False)
        want_w, want_b = start.weight, start.bias
    else:
        from fsclip.prompts_io import load_templates
        from fsclip.zeroshot import build_text_classifier

        text = build_text_classifier(tiny_openclip, small_task.pool.classes, load_templates("generic"))
        want_w, want_b = tiny_openclip.logit_scale * text.float(), torch.zeros(len(text))
    torch.testing.assert_close(adapter.head.weight, want_w.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapter.head.bias, want_b.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["partial-ft", "full-ft"])
def test_resnet_image_tower_fine_tunes_with_pretrained_batch_norm_statistics(method, tiny_resnet, small_task):
    """open_clip's ModifiedResNet (RN50's kind): its bottleneck blocks are the blocks; batch-norm running
    statistics stay the pretrained ones (few-shot batches cannot estimate them)."""
    adapter = fit(tiny_resnet, small_task.pool, method, val=small_task.val, templates="generic", blocks=1, iters=2,
                  lr=1e-2, batch_size=4) if method == "partial-ft" else fit(
        tiny_resnet, small_task.pool, method, val=small_task.val, templates="generic", iters=2, lr=1e-2, batch_size=4)
    changed = _changed(adapter, tiny_resnet)
    assert changed
    if method == "partial-ft":
        assert all(n.startswith(("visual.layer4.", "visual.attnpool.")) for n in changed)
    ours = dict(adapter.backend.model.named_buffers())
    assert all(torch.equal(b, ours[n]) for n, b in tiny_resnet.model.named_buffers() if "running" in n)
    assert adapter.train_result["blocks"] == 4
