"""transformers image-only backbones (DINOv2, ViT, ResNet, ConvNeXt, Swin, ...) through the Auto classes.

The `transformers` backend hands a model here when its config has no text tower. Checkpoints saved
with an image-classification head (`*ForImageClassification` in `config.architectures`) load with it,
so `--own-head` can use it; the features come from the backbone either way.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fsclip.backends.base import Backend
from fsclip.backends.registry import register_backend
from fsclip.errors import UsageError

__all__ = ["TransformersVisionBackend"]

# Model types whose pooler is not what their image classifier reads. ViT's pooler is a tanh layer from
# its original pre-training (fine-tuned ViT checkpoints don't even ship it, so AutoModel would draw it
# at random); ViTForImageClassification and DeiT's heads read the final-normed CLS token instead.
_CLS_TOKEN_TYPES = frozenset({"vit", "deit", "vit_msn", "vit_mae"})
_BLOCK_LISTS = ("layer", "layers", "stages", "blocks", "block")


def _image_processor(target: str):
    """The checkpoint's image processor with the PIL backend: the reference pipeline.

    transformers 5 defaults to a torchvision backend that resizes tensors; on non-square images it is
    off by 1-4 grey levels after resizing (up to 0.035 after normalisation, ViT/BiT/ConvNeXt processors,
    measured on 4 random-noise images), so it is not an exact fast path and is not used.
    """
    import transformers
    from transformers import AutoImageProcessor

    if int(transformers.__version__.split(".")[0]) >= 5:
        return AutoImageProcessor.from_pretrained(target, backend="pil")
    return AutoImageProcessor.from_pretrained(target, use_fast=False)


def _processor_sizes(processor) -> tuple[int, int]:
    """(model input side, resize side before the centre crop) from an image processor's settings."""

    def side(size) -> int | None:
        if size is None:
            return None
        size = size if isinstance(size, dict) else vars(size)  # SizeDict in transformers 5
        values = [size.get(k) for k in ("shortest_edge", "height", "width")]
        values = [v for v in values if v]
        return int(max(values)) if values else None

    resize = side(getattr(processor, "size", None))
    crop = side(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    crop_pct = getattr(processor, "crop_pct", None)
    if crop is None and crop_pct and resize:  # ConvNeXt-style: resize to side / crop_pct, crop side
        return resize, int(resize / crop_pct)
    if resize is None and crop is None:
        raise UsageError(f"cannot tell the input size from {type(processor).__name__}")
    return crop or resize, resize or crop


class TransformersVisionBackend(Backend):
    name = "transformers-vision"

    def __init__(self, spec, model, device, dtype, processor):
        super().__init__(spec, model, device, dtype)
        self._processor = processor
        self._sizes = _processor_sizes(processor)

    @classmethod
    def load(cls, spec: str, target: str, pretrained: str | None, device: torch.device, dtype: torch.dtype):
        from transformers import AutoConfig

        return cls.from_config(spec, target, AutoConfig.from_pretrained(target), device, dtype)

    @classmethod
    def from_config(cls, spec: str, target: str, config, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModel, AutoModelForImageClassification

        with_head = any(a.endswith("ForImageClassification") for a in getattr(config, "architectures", None) or [])
        auto = AutoModelForImageClassification if with_head else AutoModel
        model = auto.from_pretrained(target).to(device=device, dtype=dtype).eval()
        return cls(spec, model, device, dtype, _image_processor(target))

    # -- capabilities
    @property
    def has_text(self) -> bool:
        return False

    @property
    def has_own_head(self) -> bool:
        return self.backbone is not self.model and bool(getattr(self.model.config, "id2label", None))

    def own_head_labels(self) -> list[str]:
        if not self.has_own_head:
            return super().own_head_labels()
        id2label = self.model.config.id2label
        return [str(id2label[i]) for i in range(len(id2label))]

    def forward_own_head(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.has_own_head:
            return super().forward_own_head(pixels)
        return self.model(pixel_values=pixels).logits

    def own_head_linear(self) -> nn.Linear | None:
        head = getattr(self.model, "classifier", None) if self.has_own_head else None
        if isinstance(head, nn.Sequential):  # ResNet: Flatten, Linear
            layers = [m for m in head if not isinstance(m, nn.Flatten | nn.Dropout | nn.Identity)]
            head = layers[0] if len(layers) == 1 else None
        # DINOv2's classifier reads the CLS token and the mean patch token side by side: 2 x embed_dim
        return head if isinstance(head, nn.Linear) and head.in_features == self.embed_dim else None

    # -- what the model is
    @property
    def backbone(self) -> nn.Module:
        """The model without its classification head (the model itself when it has none)."""
        return self.model.base_model

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @cached_property
    def embed_dim(self) -> int:
        with torch.inference_mode():
            x = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device, dtype=self.dtype)
            return int(self.forward_pooled(x).shape[-1])

    @property
    def image_size(self) -> int:
        return self._sizes[0]

    @property
    def decode_size(self) -> int:
        return self._sizes[1]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._processor(images=image, return_tensors="pt")["pixel_values"][0]

    # -- forwards
    def forward_pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D) pooled features, not normalised: the pooler output, or the CLS token
        where the model type's classifier reads that (`_CLS_TOKEN_TYPES`)."""
        out = self.backbone(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None or self.model_type in _CLS_TOKEN_TYPES:
            return out.last_hidden_state[:, 0]
        return pooled.flatten(1)  # CNN poolers keep (N, C, 1, 1)

    def forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.forward_pooled(pixels), dim=-1)

    def reset_weights(self) -> None:
        """transformers' own initialisation: a new, untrained model of the same class and config."""
        self.model.load_state_dict(type(self.model)(self.model.config).state_dict())
        self.__dict__.pop("fingerprint", None)

    # -- towers
    @property
    def image_tower(self) -> nn.Module:
        return self.backbone

    def image_blocks(self) -> list[nn.Module]:
        encoder = getattr(self.backbone, "encoder", self.backbone)
        for name in _BLOCK_LISTS:
            blocks = getattr(encoder, name, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks):
                return list(blocks)
        raise UsageError(f"model {self.spec!r} ({type(self.backbone).__name__}) has no block list in its encoder")

    def attention_target_modules(self) -> list[str]:
        linear = {name.rsplit(".", 1)[-1] for name, m in self.backbone.named_modules() if isinstance(m, nn.Linear)}
        for names in (["query", "key", "value"], ["q_proj", "k_proj", "v_proj"], ["qkv"]):
            if set(names) <= linear:
                return names
        raise UsageError(f"model {self.spec!r} ({type(self.backbone).__name__}) has no attention projections")


register_backend(TransformersVisionBackend)
