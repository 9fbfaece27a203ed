import json

import pytest
import torch

from fsclip.backends import load_model
from fsclip.errors import UsageError
from fsclip.predict import UNKNOWN, top_predictions
from fsclip.prompts_io import list_templates, load_templates
from fsclip.zeroshot import ZeroShotClassifier, parse_labels


@pytest.fixture(scope="module")
def tiny(tiny_openclip_dir):
    return load_model(str(tiny_openclip_dir), device="cpu")


def test_shipped_template_sets():
    names = list_templates()
    for name in ("imagenet80", "imagenet7", "generic", "coop-oxford-pets", "coop-dtd", "coop-eurosat", "coop-ucf101"):
        assert name in names
    assert len(load_templates("imagenet80")) == 80 and len(set(load_templates("imagenet80"))) == 80
    assert set(load_templates("imagenet7")) <= set(load_templates("imagenet80"))
    assert load_templates("coop-dtd") == ["{} texture."]


def test_user_template_files_and_bad_templates(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"templates": ["a {} here.", "{}!"]}))
    assert load_templates(str(tmp_path / "t.json")) == ["a {} here.", "{}!"]
    (tmp_path / "bad.json").write_text(json.dumps(["no placeholder"]))
    with pytest.raises(UsageError, match="placeholder"):
        load_templates(str(tmp_path / "bad.json"))
    with pytest.raises(UsageError, match="imagenet80"):
        load_templates("imagenet81")


def test_parse_labels(tmp_path):
    assert parse_labels("cat, dog ,bird") == ["cat", "dog", "bird"]
    (tmp_path / "l.txt").write_text("# animals\ncat\n\ndog\n")
    assert parse_labels(labels_file=str(tmp_path / "l.txt")) == ["cat", "dog"]
    with pytest.raises(UsageError, match="duplicate"):
        parse_labels("cat,dog,cat")
    with pytest.raises(UsageError, match="at least 2"):
        parse_labels("cat")


def test_ensemble_is_mean_of_normalised_template_embeddings(tiny):
    templates = ["a photo of a {}.", "art of the {}."]
    clf = ZeroShotClassifier(tiny, ["cat", "dog"], templates, use_cache=False)
    per = tiny.encode_texts([t.replace("{}", "dog") for t in templates])  # (T, D), normalised
    expected = per.mean(0) / per.mean(0).norm()
    assert torch.allclose(clf.weights[1], expected, atol=1e-6)
    assert torch.allclose(clf.weights.norm(dim=-1), torch.ones(2), atol=1e-6)


def test_second_run_with_same_labels_encodes_no_text(tiny, monkeypatch):
    labels = ["left", "right", "up"]
    first = ZeroShotClassifier(tiny, labels, "imagenet7").weights

    def fail(*a, **k):
        raise AssertionError("text was encoded again")

    monkeypatch.setattr(tiny, "encode_texts", fail)
    assert torch.equal(ZeroShotClassifier(tiny, labels, "imagenet7").weights, first)
    with pytest.raises(AssertionError, match="encoded again"):  # a new label set is not served from cache
        ZeroShotClassifier(tiny, [*labels, "down"], "imagenet7")


def test_top_k_sorting_and_abstain():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.34, 0.33, 0.33]])
    rows = top_predictions(probs, ["a", "b", "c"], top_k=2, threshold=0.5)
    assert rows[0]["label"] == "b" and [p["label"] for p in rows[0]["predictions"]] == ["b", "c"]
    assert rows[1]["label"] == UNKNOWN and rows[1]["predictions"][0]["label"] == "a"
    with pytest.raises(UsageError):
        top_predictions(probs, ["a", "b", "c"], top_k=0)


def test_sigmoid_models_score_labels_independently(tiny_hf_siglip_dir, rgb_images):
    siglip = load_model(str(tiny_hf_siglip_dir), device="cpu")
    clf = ZeroShotClassifier(siglip, ["cat", "dog", "bird"], "generic", use_cache=False)
    feats = siglip.encode_images(torch.stack([siglip.preprocess(im) for im in rgb_images]))
    probs = clf.predict_proba(feats)
    expected = torch.sigmoid(siglip.logit_scale * feats @ clf.weights.T + siglip.logit_bias)
    assert torch.allclose(probs, expected, atol=1e-6)
