"""Shared fixtures: tiny random models built from inline configs, an isolated cache, offline hubs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

TINY_OPENCLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PREPROCESS = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
              "interpolation": "bicubic", "resize_mode": "shortest"}


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """No test writes to the user's cache or reaches a hub."""
    cache = tmp_path_factory.mktemp("fsclip-cache")
    saved = {k: os.environ.get(k) for k in ("FSCLIP_CACHE", "HF_HUB_OFFLINE", "HF_HOME")}
    os.environ["FSCLIP_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny test models: splitting their small matmuls over threads only adds OpenMP barrier waits,
    which cost 10-100x when the CPUs are shared with other work. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_openclip_dir(tmp_path_factory) -> Path:
    """A randomly initialised open_clip CLIP saved in open_clip's local-dir layout."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_OPENCLIP)
    out = tmp_path_factory.mktemp("tiny-openclip")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPENCLIP, "preprocess_cfg": PREPROCESS}))
    return out


def _clip_tokenizer(folder: Path):
    """OpenAI's CLIP BPE, rebuilt from the vocabulary open_clip ships, as a transformers tokenizer."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    # open_clip names the specials <start_of_text>/<end_of_text>; transformers expects OpenAI's names
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in simple.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


@pytest.fixture(scope="session")
def tiny_hf_clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=49407,
                         bos_token_id=49406, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    out = tmp_path_factory.mktemp("tiny-hf-clip")
    CLIPModel(cfg).eval().save_pretrained(out)
    _clip_tokenizer(out).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_hf_siglip_dir(tmp_path_factory) -> Path:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(0)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, pad_token_id=49407,
                         eos_token_id=49407, bos_token_id=49406),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
    )
    out = tmp_path_factory.mktemp("tiny-hf-siglip")
    SiglipModel(cfg).eval().save_pretrained(out)
    _clip_tokenizer(out).save_pretrained(out)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_timm_dir(tmp_path_factory) -> Path:
    """A randomly initialised timm ResNet (3 named classes) in timm's hub layout, as `save_for_hf` writes it."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3, channels=(8, 16, 32, 64), stem_width=8)
    out = tmp_path_factory.mktemp("tiny-timm")
    save_for_hf(model.eval(), out, model_config={"label_names": ["ant", "bee", "cat"]}, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def shapes_backend():
    from fsclip.backends import load_model

    return load_model("shapes", device="cpu")


@pytest.fixture
def rgb_images():
    """A few small RGB PIL images with varied content."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(40 + 3 * i, 48, 3, generator=g) * 255).byte().numpy(), "RGB")
            for i in range(5)]
