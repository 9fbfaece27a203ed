"""timm backend: image-only backbones (`timm:NAME[.TAG]`, timm `hf-hub:` repos, folders in timm's hub layout).

Features are the model's pooled pre-logits, `forward_head(forward_features(x), pre_logits=True)`:
what its classifier reads, and what a new head is trained on when the classifier is swapped.
Preprocessing is timm's own eval transform for the checkpoint (`resolve_model_data_config` +
`create_transform`), which is already torchvision on PIL images.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fsclip.backends.base import Backend
from fsclip.backends.registry import register_backend
from fsclip.errors import ModelLoadError, UsageError

__all__ = ["TimmBackend", "own_labels"]


def own_labels(model: nn.Module) -> list[str] | None:
    """Class names of a timm classifier, in logit order, or None when nothing names them.

    The checkpoint's `label_names` (with `label_descriptions` where given) come first; else the
    ImageNet subset that timm infers from the class count, named by each synset's first lemma
    (ImageNet-1k has a few lemmas twice, e.g. "crane" the bird and the machine: those get the synset).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    n = int(getattr(model, "num_classes", 0) or 0)
    names = cfg.get("label_names")
    if names is not None:
        names = [names[i] for i in range(n)] if isinstance(names, dict) else list(names)
        descriptions = cfg.get("label_descriptions") or {}
        names = [str(descriptions.get(name, name)) for name in names]
    else:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset is None:
            return None
        info = ImageNetInfo(subset)
        synsets = info.label_names()
        names = [info.label_name_to_description(s).split(",")[0].strip() for s in synsets]
        dupes = {x for x in names if names.count(x) > 1}
        names = [f"{x} ({s})" if x in dupes else x for x, s in zip(names, synsets)]
    return names if len(names) == n else None


def _check_name(target: str) -> None:
    """Unknown architectures and tags fail here in one line, not as a cache miss after a hub lookup."""
    import difflib

    import timm
    from timm.models import split_model_name_tag

    arch, tag = split_model_name_tag(target)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ModelLoadError(f"unknown timm model {arch!r}{hint}")
    tags = [name.partition(".")[2] for name in timm.list_pretrained(f"{arch}.*")]
    if tag and tag not in tags:
        raise ModelLoadError(f"timm model {arch!r} has no pretrained tag {tag!r}; "
                             f"choose one of: {', '.join(tags) or '(none: it has no pretrained weights)'}")


class TimmBackend(Backend):
    name = "timm"

    def __init__(self, spec, model, device, dtype, data_config: dict):
        super().__init__(spec, model, device, dtype)
        from timm.data import create_transform

        self.data_config = data_config
        self._transform = create_transform(**data_config, is_training=False)

    @classmethod
    def load(cls, spec: str, target: str, pretrained: str | None, device: torch.device, dtype: torch.dtype):
        import timm
        from timm.data import resolve_model_data_config

        if not target.startswith(("hf-hub:", "local-dir:")):
            _check_name(target)
        model = timm.create_model(target, pretrained=True)
        return cls(spec, model.to(device=device, dtype=dtype).eval(), device, dtype, resolve_model_data_config(model))

    # -- capabilities
    @property
    def has_text(self) -> bool:
        return False

    @property
    def has_own_head(self) -> bool:
        return self._labels is not None

    def own_head_labels(self) -> list[str]:
        if self._labels is None:
            return super().own_head_labels()
        return list(self._labels)

    def own_head_linear(self) -> nn.Linear | None:
        head = self.model.get_classifier() if self._labels is not None else None
        return head if isinstance(head, nn.Linear) and head.in_features == self.embed_dim else None

    @cached_property
    def _labels(self) -> list[str] | None:
        if not getattr(self.model, "num_classes", 0):
            return None
        return own_labels(self.model) or [str(i) for i in range(self.model.num_classes)]

    # -- what the model is
    @cached_property
    def embed_dim(self) -> int:
        dim = getattr(self.model, "head_hidden_size", None) or self.model.num_features
        return int(dim)

    @property
    def image_size(self) -> int:
        return int(max(self.data_config["input_size"][1:]))

    @property
    def decode_size(self) -> int:
        crop_pct = self.data_config.get("crop_pct") or 1.0
        return int(math.floor(self.image_size / crop_pct))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image)

    @property
    def transform(self):
        """timm's eval transform for this checkpoint (Resize, CenterCrop, ToTensor, Normalize)."""
        return self._transform

    # -- forwards
    def forward_pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D) pooled pre-logits, not normalised: what the classifier reads."""
        return self.model.forward_head(self.model.forward_features(pixels), pre_logits=True)

    def forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.forward_pooled(pixels), dim=-1)

    def forward_own_head(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._labels is None:
            return super().forward_own_head(pixels)
        return self.model(pixels)

    def reset_weights(self) -> None:
        """timm's own initialisation: a new, untrained model of the same architecture and arguments."""
        import timm

        arch = (getattr(self.model, "pretrained_cfg", None) or {}).get("architecture")
        try:
            fresh = timm.create_model(arch, pretrained=False, **getattr(self.model, "_model_args", {}))
        except (RuntimeError, TypeError):  # not recreatable from what it recorded: the generic reset
            return super().reset_weights()
        theirs, ours = fresh.state_dict(), self.model.state_dict()
        if theirs.keys() != ours.keys() or any(theirs[k].shape != ours[k].shape for k in ours):
            return super().reset_weights()
        self.model.load_state_dict(theirs)
        self.__dict__.pop("fingerprint", None)

    # -- towers
    @property
    def image_tower(self) -> nn.Module:
        return self.model

    def image_blocks(self) -> list[nn.Module]:
        # timm records each reduction stage (CNNs) or block (ViTs) in `feature_info`, first to last;
        # a CNN's first entry is often the stem's activation, which holds no weights and is no stage
        names = [info["module"] for info in getattr(self.model, "feature_info", [])]
        blocks = [self.model.get_submodule(n) for n in names if n]
        blocks = [b for b in blocks if next(b.parameters(), None) is not None]
        if not blocks:
            raise UsageError(f"model {self.spec!r} ({type(self.model).__name__}) does not list its stages")
        return blocks

    def attention_target_modules(self) -> list[str]:
        linear = {name.rsplit(".", 1)[-1] for name, m in self.model.named_modules() if isinstance(m, nn.Linear)}
        if "qkv" in linear:  # timm ViT, Swin, EVA, ...: one fused projection per attention block
            return ["qkv"]
        found = sorted(linear & {"q", "k", "v", "q_proj", "k_proj", "v_proj"})
        if found:
            return found
        raise UsageError(f"model {self.spec!r} ({type(self.model).__name__}) has no attention projections")


register_backend(TimmBackend)
