"""timm backend: parity with timm's own pre-logits on identical random weights, specs and folders, capabilities."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fsclip.backends import load_model
from fsclip.backends.registry import resolve_spec
from fsclip.errors import UsageError

timm = pytest.importorskip("timm")

TINY = {
    "resnet10t": {"channels": (8, 16, 32, 64), "stem_width": 8, "num_classes": 5},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                             "num_classes": 4},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread for the module (see tests/conftest.py)."""


def _save(arch: str, folder, **config):
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **TINY[arch]).eval()
    save_for_hf(model, folder, model_config=config or None, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny_timm(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, _save(request.param, folder), folder


def test_features_equal_timm_pre_logits(tiny_timm, rgb_images):
    arch, ref, folder = tiny_timm
    ours = load_model(str(folder), device="cpu")
    assert ours.name == "timm" and not ours.has_text
    pixels = torch.stack([ours.preprocess(im) for im in rgb_images])
    # the eval transform timm builds for the saved checkpoint (an in-memory ViT built with img_size=32
    # still reports its architecture's 224 px; the saved config records 32)
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    tf = timm.data.create_transform(**timm.data.resolve_model_data_config(loaded), is_training=False)
    assert torch.equal(pixels, torch.stack([tf(im) for im in rgb_images]))
    with torch.no_grad():
        pre_logits = ref.forward_head(ref.forward_features(pixels), pre_logits=True)
        logits = ref(pixels)
    assert ours.embed_dim == pre_logits.shape[1]
    assert (ours.encode_images(pixels) - F.normalize(pre_logits, dim=-1)).abs().max() <= 1e-5
    assert (ours.encode_own_head(pixels) - logits).abs().max() <= 1e-5


def test_capabilities_of_an_image_only_model(tiny_timm):
    arch, _, folder = tiny_timm
    ours = load_model(str(folder), device="cpu")
    assert not ours.has_text and ours.has_own_head
    # no label names in the checkpoint and no ImageNet class count: the head's indices name the classes
    assert ours.own_head_labels() == [str(i) for i in range(TINY[arch]["num_classes"])]
    for call in (lambda: ours.encode_texts(["a cat"]), lambda: ours.tokenize(["a"]), lambda: ours.logit_scale,
                 lambda: ours.text_tower):
        with pytest.raises(UsageError, match="has no text tower; .*fsclip fit") as e:
            call()
        assert "\n" not in str(e.value) and str(folder) in str(e.value)
    blocks = ours.image_blocks()
    assert blocks and all(isinstance(b, torch.nn.Module) for b in blocks)
    if arch.startswith("vit"):
        assert ours.attention_target_modules() == ["qkv"] and len(blocks) == 2
    else:
        with pytest.raises(UsageError, match="no attention projections"):
            ours.attention_target_modules()


def test_folder_auto_detection_and_spec_forms(tiny_timm, tiny_hf_clip_dir, tiny_openclip_dir):
    _, _, folder = tiny_timm
    assert resolve_spec(str(folder)) == resolve_spec(f"timm:{folder}")
    assert resolve_spec(str(folder)).target == f"local-dir:{folder}"
    # other folders keep their backends: a transformers config.json has no top-level "architecture"
    assert resolve_spec(str(tiny_hf_clip_dir)).backend == "transformers"
    assert resolve_spec(str(tiny_openclip_dir)).backend == "open_clip"
    r = resolve_spec("timm:resnet50.a1_in1k")
    assert (r.backend, r.target) == ("timm", "resnet50.a1_in1k")
    assert resolve_spec("timm:hf-hub:timm/resnet18.a1_in1k").target == "hf-hub:timm/resnet18.a1_in1k"


def test_own_head_names_from_the_checkpoint_and_from_imagenet(tmp_path):
    labels = ["circle", "square", "star", "ring", "cross"]
    _save("resnet10t", tmp_path / "named", label_names=labels)
    assert load_model(str(tmp_path / "named"), device="cpu").own_head_labels() == labels
    from fsclip.backends.timm import own_labels

    model = timm.create_model("resnet10t", pretrained=False, num_classes=1000, channels=(8, 8, 8, 8), stem_width=8)
    names = own_labels(model)
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"
    assert len(set(names)) == 1000  # the two "crane"s, "maillot"s, ... carry their synset
    assert "crane (n02012849)" in names and "crane (n03126707)" in names


def _fake_hub_cache(cache, repo: str, files: dict[str, bytes]) -> None:
    """A repo in huggingface_hub's cache layout, as a download on a connected machine leaves it."""
    base = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_hf_hub_repo_is_timm_when_its_cached_files_say_so(tmp_path, monkeypatch):
    from huggingface_hub import constants

    saved = tmp_path / "saved"
    ref = _save("resnet10t", saved)
    files = {p.name: p.read_bytes() for p in saved.iterdir()}
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _fake_hub_cache(tmp_path / "hub", "someone/tiny-resnet", files)
    _fake_hub_cache(tmp_path / "hub", "someone/tiny-clip", {"open_clip_config.json": b"{}", "config.json": b"{}"})
    assert resolve_spec("hf-hub:someone/tiny-resnet").backend == "timm"
    assert resolve_spec("hf-hub:someone/tiny-clip").backend == "open_clip"
    assert resolve_spec("hf-hub:someone/not-cached").backend == "open_clip"  # unknown: open_clip, as before
    ours = load_model("hf-hub:someone/tiny-resnet", device="cpu")  # offline, from the cache
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = F.normalize(ref.forward_head(ref.forward_features(x), pre_logits=True), dim=-1)
    assert (ours.encode_images(x) - expected).abs().max() <= 1e-5
    assert json.loads(files["config.json"])["architecture"] == "resnet10t"


def test_uncached_timm_model_fails_fast_in_one_line(tmp_path):
    spec = "timm:resnet50.a1_in1k"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "FSCLIP_CACHE": str(tmp_path),
           "TORCH_HOME": str(tmp_path)}
    (tmp_path / "x.png").write_bytes(b"")
    code = f"from fsclip.cli import main; raise SystemExit(main(['classify', '.', '--own-head', '--model', {spec!r}]))"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 2, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("fsclip: error")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert spec in err[0] and str(tmp_path / "hub") in err[0] and "save_for_hf" in err[0]


ASSET = Path(__file__).resolve().parents[2] / "fsclip" / "assets" / "shapes-resnet"


@pytest.mark.skipif(not (ASSET / "model.safetensors").is_file(), reason="bundled backbone not trained yet")
def test_bundled_backbone_by_name_and_as_a_plain_folder():
    from safetensors import safe_open

    from fsclip.shapes.train_backbone import CLASSES, IMAGE_SIZE

    by_name, by_path = load_model("shapes-resnet", device="cpu"), load_model(str(ASSET), device="cpu")
    assert by_name.name == by_path.name == "timm" and by_name.fingerprint == by_path.fingerprint
    assert by_name.has_own_head and by_name.own_head_labels() == list(CLASSES)
    assert (by_name.image_size, by_name.decode_size) == (IMAGE_SIZE, IMAGE_SIZE)
    cfg = json.loads((ASSET / "config.json").read_text())
    assert cfg["architecture"] == "resnet10t" and cfg["num_classes"] == len(CLASSES) == len(cfg["label_names"])
    assert {"mean", "std", "input_size"} <= set(cfg["pretrained_cfg"])
    with safe_open(ASSET / "model.safetensors", "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    assert sum(p.stat().st_size for p in ASSET.iterdir()) < 4 * 2**20


@pytest.mark.parametrize(("spec", "message"), [
    ("timm:resnt50", "unknown timm model 'resnt50'; did you mean resnet50"),
    ("timm:resnet50.no_such_tag", "has no pretrained tag 'no_such_tag'; choose one of: a1_in1k"),
])
def test_unknown_timm_names_fail_before_any_download(spec, message):
    from fsclip.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=message):
        load_model(spec, device="cpu")
