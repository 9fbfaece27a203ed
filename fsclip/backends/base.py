"""The one interface every model backend implements."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property
from typing import ClassVar, Literal

import torch
from PIL import Image
from torch import nn

__all__ = ["Backend"]


class Backend(ABC):
    """A CLIP-style image-text model behind a small, uniform surface.

    `encode_*` run in eval mode without gradients and return L2-normalised float32 features on the
    CPU-or-model device; `forward_*` keep gradients for adapters that train the towers.
    """

    name: ClassVar[str]

    def __init__(self, spec: str, model: nn.Module, device: torch.device, dtype: torch.dtype):
        self.spec = spec
        self.model = model
        self.device = device
        self.dtype = dtype

    # -- what the model is
    @property
    @abstractmethod
    def embed_dim(self) -> int: ...

    @property
    @abstractmethod
    def loss_kind(self) -> Literal["softmax", "sigmoid"]:
        """`softmax` for CLIP-style contrastive models, `sigmoid` for SigLIP."""

    @property
    @abstractmethod
    def exact_short_text(self) -> bool:
        """True where encoding only up to the longest real sequence is exact (causal text tower)."""

    @property
    def logit_scale(self) -> float:
        return float(self._logit_scale_param().exp())

    @property
    def logit_bias(self) -> float | None:
        bias = self._logit_bias_param()
        return None if bias is None else float(bias)

    @abstractmethod
    def _logit_scale_param(self) -> torch.Tensor: ...

    def _logit_bias_param(self) -> torch.Tensor | None:
        return None

    @cached_property
    def fingerprint(self) -> str:
        """Short hash of the weights: names, shapes and a strided sample of every tensor."""
        h = hashlib.sha256()
        for key, tensor in sorted(self.model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            sample = flat[::step][:64].to("cpu", torch.float32).contiguous()
            h.update(f"{key}:{tuple(tensor.shape)}".encode())
            h.update(sample.numpy().tobytes())
        return h.hexdigest()[:16]

    # -- inputs
    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, H, W) float tensor, exactly as the model was trained."""

    @property
    @abstractmethod
    def image_size(self) -> int: ...

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> model inputs, padded to the length `forward_texts` needs (short where exact)."""

    # -- differentiable forwards (normalised features)
    @abstractmethod
    def forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D), normalised, with gradients."""

    @abstractmethod
    def forward_texts(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenised texts -> (N, D), normalised, with gradients."""

    # -- towers, for adapters that train parts of them
    @property
    @abstractmethod
    def image_tower(self) -> nn.Module: ...

    @property
    @abstractmethod
    def text_tower(self) -> nn.Module: ...

    @abstractmethod
    def image_blocks(self) -> list[nn.Module]:
        """The vision transformer's residual blocks, first to last."""

    @abstractmethod
    def attention_target_modules(self) -> list[str]:
        """Module-name suffixes that LoRA should wrap in both towers' attention (after `split_attention`)."""

    # -- optional capabilities: adapters ask for them and refuse in one line where they are missing
    def split_attention(self) -> None:
        """Give every fused attention layer separate q, k, v projections, in place and numerically identical.

        Only for a private copy of the model (LoRA's); `fuse_attention` undoes it. A no-op where the
        attention already has separate projections.
        """
        return None

    def fuse_attention(self, model: nn.Module) -> nn.Module:
        """`model` with split attention fused back into the library's own layout (to save it loadable)."""
        return model

    def text_token_embedding(self) -> nn.Module | None:
        """The text tower's token-embedding layer, whose outputs prompt learning (CoOp) replaces, or None."""
        return None

    def image_projection(self) -> str | None:
        """Name in `model` of the image tower's final linear projection (ProLIP trains it), or None."""
        return None

    def forward_image_pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, W) pooled image features before the final projection, with gradients."""
        raise NotImplementedError(f"{self.spec!r} has no separate final image projection")

    def project_image(self, pooled: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(N, W) pooled features through `weight` (shaped like the `image_projection` parameter) -> (N, D)."""
        raise NotImplementedError(f"{self.spec!r} has no separate final image projection")

    # -- batched inference
    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D) normalised float32 features."""
        self.model.eval()
        out = [
            self.forward_images(pixels[i : i + batch_size].to(self.device, self.dtype)).float()
            for i in range(0, len(pixels), batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0, self.embed_dim, device=self.device)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> (N, D) normalised float32 features.

        Batches are formed from texts of similar token length, so that with a causal tower each batch
        is only as long as its own longest text.
        """
        self.model.eval()
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim, device=self.device)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.embed_dim, device=self.device)
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            inputs = {k: v.to(self.device) for k, v in self.tokenize([texts[i] for i in idx]).items()}
            out[idx] = self.forward_texts(inputs).float()
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, device={self.device}, dtype={self.dtype})"
