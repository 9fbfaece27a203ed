"""transformers backend: CLIP and SigLIP repos on the hub or in a local folder with config.json.

Configs without a text tower load as image-only backbones (`fsclip.backends.hf_vision`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from functools import cached_property
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fsclip.backends.base import Backend
from fsclip.backends.registry import register_backend

__all__ = ["TransformersBackend"]


def _pixel_values(processor, image: Image.Image) -> torch.Tensor:
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def _features(out) -> torch.Tensor:
    # transformers>=5 returns a ModelOutput whose pooler_output is the projected feature; 4.x a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class TransformersBackend(Backend):
    name = "transformers"

    def __init__(self, spec, model, device, dtype, processor, tokenizer):
        super().__init__(spec, model, device, dtype)
        self._processor = processor
        self._tokenizer = tokenizer

    @classmethod
    def load(cls, spec: str, target: str, pretrained: str | None, device: torch.device, dtype: torch.dtype):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        config = AutoConfig.from_pretrained(target)
        if getattr(config, "text_config", None) is None:  # no text tower: DINOv2, ViT, ResNet, ...
            from fsclip.backends.hf_vision import TransformersVisionBackend

            return TransformersVisionBackend.from_config(spec, target, config, device, dtype)
        model = AutoModel.from_pretrained(target).to(device=device, dtype=dtype).eval()
        if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
            from fsclip.errors import ModelLoadError

            raise ModelLoadError(
                f"{spec!r} loads as {type(model).__name__}, which is not a dual-encoder (CLIP/SigLIP) model"
            )
        processor = AutoImageProcessor.from_pretrained(target)
        tokenizer = AutoTokenizer.from_pretrained(target)
        return cls(spec, model, device, dtype, processor, tokenizer)

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @cached_property
    def embed_dim(self) -> int:
        cfg = self.model.config
        dim = getattr(cfg, "projection_dim", None)
        return int(dim if dim is not None else cfg.vision_config.hidden_size)

    @property
    def loss_kind(self) -> Literal["softmax", "sigmoid"]:
        return "sigmoid" if getattr(self.model, "logit_bias", None) is not None else "softmax"

    @property
    def exact_short_text(self) -> bool:
        # CLIPTextModel is causal and pools at the first end-of-text token; SigLIP's text tower is
        # bidirectional and was trained on max-length padding, so its padding changes the result.
        return self.model_type == "clip"

    def _logit_scale_param(self) -> torch.Tensor:
        return self.model.logit_scale.detach()

    def _logit_bias_param(self) -> torch.Tensor | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else bias.detach()

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return _pixel_values(self._processor, image)

    @property
    def transform(self):
        """`preprocess` bound to the image processor alone (no weights), for worker processes."""
        return functools.partial(_pixel_values, self._processor)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        max_length = self.model.config.text_config.max_position_embeddings
        padding = "longest" if self.exact_short_text else "max_length"
        enc = self._tokenizer(
            list(texts), padding=padding, max_length=max_length, truncation=True, return_tensors="pt"
        )
        keep = ("input_ids", "attention_mask") if self.exact_short_text else ("input_ids",)
        return {k: enc[k] for k in keep if k in enc}

    def forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)), dim=-1)

    def forward_texts(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(_features(self.model.get_text_features(**inputs)), dim=-1)

    @property
    def image_tower(self) -> nn.Module:
        return self.model.vision_model

    @property
    def text_tower(self) -> nn.Module:
        return self.model.text_model

    def image_blocks(self) -> list[nn.Module]:
        return list(self.model.vision_model.encoder.layers)

    def attention_target_modules(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj"]

    def text_token_embedding(self) -> nn.Module | None:
        return self.model.text_model.embeddings.token_embedding

    def image_projection(self) -> str | None:
        return "visual_projection.weight" if isinstance(getattr(self.model, "visual_projection", None), nn.Linear) \
            else None

    def forward_image_pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=pixels).pooler_output

    def project_image(self, pooled: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return pooled @ weight.T  # nn.Linear layout: (N, W) @ (W, D) -> (N, D)


register_backend(TransformersBackend)
