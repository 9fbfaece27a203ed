"""CLAP, ProLIP and CoOp do what their papers define, on tiny random models (accuracy: test_accuracy.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsclip.adapters import fit
from fsclip.adapters.clap import zero_shot_multipliers
from fsclip.adapters.coop import Prompts, paper_epochs
from fsclip.errors import AdapterError
from fsclip.prompts_io import load_templates
from fsclip.zeroshot import build_text_classifier


def _zero_shot(backend, task):
    return build_text_classifier(backend, task.pool.classes, load_templates("generic")).float()


# -- CLAP
def test_clap_penalty_weights_are_the_zero_shot_probability_of_the_true_class():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    targets = torch.tensor([0, 0, 1])
    p = logits.softmax(-1)
    want = torch.tensor([(p[0, 0] + p[1, 0]) / 2, p[2, 1]])
    torch.testing.assert_close(zero_shot_multipliers(logits, targets, 2), want)


def test_clap_starts_at_zero_shot_and_is_held_there_by_its_penalty(tiny_openclip, small_task):
    """lr ~ 0: the prototypes are the zero-shot ones; with training they move, but less where the
    zero-shot model was already right on the class (larger penalty weight)."""
    text = _zero_shot(tiny_openclip, small_task)
    still = fit(tiny_openclip, small_task.pool, "clap", val=small_task.val, templates="generic", epochs=1, views=1,
                lr=1e-12)
    torch.testing.assert_close(F.normalize(still.weight, dim=-1), text, atol=1e-6, rtol=0)
    moved = fit(tiny_openclip, small_task.pool, "clap", val=small_task.val, templates="generic", epochs=20, views=2,
                lr=50.0)
    shift = (F.normalize(moved.weight, dim=-1) - text).norm(dim=-1)
    assert (shift > 1e-3).all()
    weights = torch.tensor(moved.selection["penalty weights"])
    assert weights.min() >= 0 and weights.max() <= 1
    assert shift[weights.argmax()] <= shift[weights.argmin()]
    assert "nothing searched" in moved.selection["chosen by"]


# -- ProLIP
def test_prolip_trains_only_the_final_image_projection(tiny_openclip, small_task):
    adapter = fit(tiny_openclip, small_task.pool, "prolip", val=small_task.val, templates="generic", epochs=5,
                  views=2, lr=0.1)
    base = dict(tiny_openclip.model.named_parameters())
    changed = {n for n, p in adapter.backend.model.named_parameters() if not torch.equal(p, base[n])}
    assert changed == {"visual.proj"}
    assert adapter.selection["penalty"] == pytest.approx(1 / 6)  # 1 / K, the paper's validation-free rule
    text = _zero_shot(tiny_openclip, small_task)
    torch.testing.assert_close(adapter.text, tiny_openclip.logit_scale * text)  # the classifier stays zero-shot's


def test_prolip_on_transformers_clip(tiny_hf_clip, small_task):
    adapter = fit(tiny_hf_clip, small_task.pool, "prolip", val=small_task.val, templates="generic", epochs=3, views=1,
                  lr=0.1)
    base = dict(tiny_hf_clip.model.named_parameters())
    changed = {n for n, p in adapter.backend.model.named_parameters() if not torch.equal(p, base[n])}
    assert changed == {"visual_projection.weight"}


def test_prolip_pooled_features_through_the_projection_are_the_image_features(tiny_openclip, tiny_hf_clip):
    for backend in (tiny_openclip, tiny_hf_clip):
        pixels = torch.randn(2, 3, 32, 32)
        name = backend.image_projection()
        weight = dict(backend.model.named_parameters())[name]
        with torch.no_grad():
            ours = F.normalize(backend.project_image(backend.forward_image_pooled(pixels), weight), dim=-1)
            torch.testing.assert_close(ours, backend.forward_images(pixels), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("which", "tower"), [("tiny_resnet", "ModifiedResNet"),
                                             ("tiny_hf_siglip", "SiglipVisionModel")])
def test_prolip_refuses_a_tower_without_a_separate_projection(which, tower, request, small_task):
    backend = request.getfixturevalue(which)
    with pytest.raises(AdapterError, match=f"final linear projection.*{tower}.*use clap") as err:
        fit(backend, small_task.pool, "prolip", val=small_task.val, templates="generic", epochs=1, views=1)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def tiny_hf_siglip(tiny_hf_siglip_dir):
    from fsclip.backends import load_model

    return load_model(f"hf:{tiny_hf_siglip_dir}", device="cpu")


@pytest.mark.parametrize("method", ["clap", "coop", "prolip", "tip-adapter", "tip-adapter-f", "linear-probe",
                                    "lora", "partial-ft", "full-ft"])
def test_every_method_runs_on_transformers_clip(method, tiny_hf_clip, small_task, fast_options):
    adapter = fit(tiny_hf_clip, small_task.pool, method, val=small_task.val, templates="generic",
                  **fast_options.get(method, {}))
    probs = adapter.predict_proba(small_task.test.paths)
    assert probs.shape == (len(small_task.test), 3) and torch.isfinite(probs).all()


# -- CoOp
def test_coop_epochs_follow_the_paper():
    assert [paper_epochs(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]


@pytest.mark.parametrize("which", ["tiny_openclip", "tiny_hf_clip"])
def test_coop_context_replaces_the_placeholders_and_only_them(which, request, small_task):
    backend = request.getfixturevalue(which)
    prompts = Prompts(backend, small_task.pool.classes, n_ctx=4)
    width = prompts.embedding.weight.shape[1]
    ctx = torch.randn(4, width)
    seen = []
    with torch.no_grad(), prompts.context(ctx):
        # registered after the context's own hook, so it sees the swapped embeddings the tower gets
        handle = prompts.embedding.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            prompts.backend.forward_texts(prompts.inputs)
        finally:
            handle.remove()
    embedded = seen[0]
    start = prompts.start
    torch.testing.assert_close(embedded[:, start:start + 4], ctx.expand(len(embedded), -1, -1))
    plain = prompts.embedding(prompts.inputs["input_ids"])
    torch.testing.assert_close(embedded[:, :start], plain[:, :start])
    torch.testing.assert_close(embedded[:, start + 4:], plain[:, start + 4:])


def test_coop_learns_the_context_and_leaves_the_model_as_it_was(tiny_openclip, small_task):
    flags = {n: p.requires_grad for n, p in tiny_openclip.model.named_parameters()}
    before = {n: p.detach().clone() for n, p in tiny_openclip.model.named_parameters()}
    adapter = fit(tiny_openclip, small_task.pool, "coop", val=small_task.val, templates="generic", epochs=3, views=1,
                  n_ctx=4, lr=0.5)
    assert adapter.context.shape == (4, 32) and adapter.context.abs().max() > 0.05  # moved off N(0, 0.02)
    assert all(torch.equal(p, before[n]) for n, p in tiny_openclip.model.named_parameters())
    assert {n: p.requires_grad for n, p in tiny_openclip.model.named_parameters()} == flags
    assert all(p.grad is None for p in tiny_openclip.model.parameters())
    prompts = Prompts(tiny_openclip, small_task.pool.classes, 4)
    with torch.no_grad():
        want = tiny_openclip.logit_scale * prompts.encode(adapter.context)
    torch.testing.assert_close(adapter.text, want, atol=1e-5, rtol=1e-5)
