import os
import subprocess
import sys
import time

import pytest

from fsclip.backends import load_model, resolve_device, resolve_dtype
from fsclip.backends.registry import resolve_spec
from fsclip.errors import ModelLoadError, UsageError


@pytest.mark.parametrize(
    ("spec", "backend", "target", "pretrained"),
    [
        ("ViT-B-32@laion2b_s34b_b79k", "open_clip", "ViT-B-32", "laion2b_s34b_b79k"),
        ("open_clip:ViT-B-16", "open_clip", "ViT-B-16", None),
        ("ViT-B-32", "open_clip", "ViT-B-32", None),
        ("hf-hub:timm/ViT-B-16-SigLIP", "open_clip", "hf-hub:timm/ViT-B-16-SigLIP", None),
        ("openai/clip-vit-base-patch32", "transformers", "openai/clip-vit-base-patch32", None),
        ("hf:google/siglip-base-patch16-224", "transformers", "google/siglip-base-patch16-224", None),
    ],
)
def test_spec_syntax(spec, backend, target, pretrained):
    r = resolve_spec(spec)
    assert (r.backend, r.target, r.pretrained) == (backend, target, pretrained)


def test_bare_folders_are_detected(tiny_openclip_dir, tiny_hf_clip_dir, tmp_path):
    assert resolve_spec(str(tiny_openclip_dir)).backend == "open_clip"
    assert resolve_spec(str(tiny_hf_clip_dir)).backend == "transformers"
    with pytest.raises(ModelLoadError, match="neither open_clip_config.json"):
        resolve_spec(str(tmp_path))


def test_unknown_spec_says_what_would_work():
    with pytest.raises(ModelLoadError, match="ARCH@TAG"):
        resolve_spec("no-such-model")


def test_bad_device_and_dtype_are_usage_errors():
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("gpu0")
    with pytest.raises(UsageError, match="fp32"):
        resolve_dtype("float8", resolve_device("cpu"))


@pytest.mark.parametrize("spec", ["ViT-B-32@laion2b_s34b_b79k", "openai/clip-vit-base-patch32"])
def test_uncached_hub_model_fails_fast_in_one_line(spec, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "FSCLIP_CACHE": str(tmp_path)}
    code = f"from fsclip.cli import main; raise SystemExit(main(['classify', '.', '--labels', 'a,b', '--model', {spec!r}]))"
    (tmp_path / "x.png").write_bytes(b"")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("fsclip: error")]
    assert len(err) == 1, proc.stderr
    assert spec in err[0] and "local folder" in err[0] and "Traceback" not in proc.stderr


def test_load_model_wraps_errors(tmp_path):
    (tmp_path / "open_clip_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(tmp_path), device="cpu")
