"""open_clip backend: built-in architectures with pretrained tags, `hf-hub:` repos, local-dir folders."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fsclip.backends.base import Backend
from fsclip.backends.registry import register_backend

__all__ = ["OpenClipBackend"]


class _TextParts:
    """The pieces of an open_clip text tower, whether they hang off `CLIP` or `CustomTextCLIP.text`."""

    def __init__(self, model: nn.Module):
        owner = model.text if hasattr(model, "text") else model
        self.owner = owner
        self.token_embedding = getattr(owner, "token_embedding", None)
        self.positional_embedding = getattr(owner, "positional_embedding", None)
        self.transformer = getattr(owner, "transformer", None)
        self.ln_final = getattr(owner, "ln_final", None)
        self.text_projection = getattr(owner, "text_projection", None)
        self.attn_mask = getattr(owner, "attn_mask", None)
        self.cls_emb = getattr(owner, "cls_emb", None)
        self.pool_type = getattr(owner, "pool_type", getattr(owner, "text_pool_type", None))
        self.eos_id = getattr(owner, "eos_id", getattr(owner, "text_eos_id", None))

    @property
    def causal_and_pooled_at_eot(self) -> bool:
        # Exact truncation needs: a causal mask (later tokens cannot change earlier ones) and pooling
        # at or before the end-of-text token; CoCa's appended cls token and HF text towers don't qualify.
        return (
            self.token_embedding is not None
            and self.attn_mask is not None
            and self.cls_emb is None
            and self.pool_type in ("argmax", "eos", "first")
        )

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)

    def forward_truncated(self, tokens: torch.Tensor) -> torch.Tensor:
        # (N, L) tokens already cut to the batch's longest real sequence
        n, length = tokens.shape
        cast = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(cast) + self.positional_embedding[:length].to(cast)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        x = x[torch.arange(n, device=x.device), self.pool_index(tokens)]  # (N, width)
        proj = self.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x


class SplitQKVAttention(nn.Module):
    """`nn.MultiheadAttention` (self-attention, as open_clip's blocks call it) with separate q, k, v projections.

    The same computation as the fused layer, with `in_proj_weight` cut into three `nn.Linear` layers
    that PEFT can wrap one by one (CLIP-LoRA adapts q, k and v, each with its own low-rank update and
    dropout). `fused()` gives the `nn.MultiheadAttention` back, with the current weights.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        dim, bias = mha.embed_dim, mha.in_proj_bias is not None
        self.num_heads, self.batch_first, self.dropout = mha.num_heads, mha.batch_first, mha.dropout
        weights = mha.in_proj_weight.detach().chunk(3)
        biases = mha.in_proj_bias.detach().chunk(3) if bias else (None,) * 3
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
            layer = nn.Linear(dim, dim, bias=bias, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                layer.weight.copy_(w)
                if bias:
                    layer.bias.copy_(b)
            setattr(self, name, layer)
        self.out_proj = mha.out_proj

    def forward(self, query, key, value, need_weights: bool = False, attn_mask=None, key_padding_mask=None,
                **_):
        if need_weights or key_padding_mask is not None:
            raise ValueError("split attention supports need_weights=False without key_padding_mask only")
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, dim = query.shape
        heads = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:  # (N, L, E) -> (N, heads, L, E / heads)
            return x.view(n, -1, heads, dim // heads).transpose(1, 2)

        q, k, v = split(self.q_proj(query)), split(self.k_proj(key)), split(self.v_proj(value))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # MultiheadAttention: True = masked out; SDPA: True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, dim))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def fused(self) -> nn.MultiheadAttention:
        dim = self.q_proj.in_features
        bias = self.q_proj.bias is not None
        w = self.q_proj.weight
        mha = nn.MultiheadAttention(dim, self.num_heads, dropout=self.dropout, bias=bias,
                                    batch_first=self.batch_first, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
            if bias:
                mha.in_proj_bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
        mha.out_proj = self.out_proj
        return mha


def _replace_modules(model: nn.Module, convert) -> nn.Module:
    """Replace every sub-module `m` for which `convert(m)` returns a module."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = convert(child)
            if new is not None:
                setattr(parent, name, new)
    return model


class OpenClipBackend(Backend):
    name = "open_clip"

    def __init__(self, spec, model, device, dtype, preprocess, tokenizer):
        super().__init__(spec, model, device, dtype)
        self._preprocess = preprocess
        self._tokenizer = tokenizer
        self._text = _TextParts(model)

    @classmethod
    def load(cls, spec: str, target: str, pretrained: str | None, device: torch.device, dtype: torch.dtype):
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(
            target, pretrained=pretrained, device=device, precision=_precision(dtype)
        )
        tokenizer = open_clip.get_tokenizer(target)
        return cls(spec, model.eval(), device, dtype, preprocess, tokenizer)

    @cached_property
    def embed_dim(self) -> int:
        dim = getattr(self.model.visual, "output_dim", None)
        if dim is None:  # towers that don't record it (timm, some HF text configs)
            with torch.inference_mode():
                dim = self.model.encode_image(torch.zeros(1, 3, self.image_size, self.image_size,
                                                          device=self.device, dtype=self.dtype)).shape[-1]
        return int(dim)

    @property
    def loss_kind(self) -> Literal["softmax", "sigmoid"]:
        return "sigmoid" if getattr(self.model, "logit_bias", None) is not None else "softmax"

    @property
    def exact_short_text(self) -> bool:
        return self._text.causal_and_pooled_at_eot

    def _logit_scale_param(self) -> torch.Tensor:
        return self.model.logit_scale.detach()

    def _logit_bias_param(self) -> torch.Tensor | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else bias.detach()

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._preprocess(image)

    @property
    def transform(self):
        """The open_clip eval transform (Resize, CenterCrop, ToTensor, Normalize); holds no weights."""
        return self._preprocess

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self._tokenizer(list(texts))
        if self.exact_short_text:
            length = int(self._text.pool_index(tokens).max()) + 1
            tokens = tokens[:, :length]
        return {"input_ids": tokens}

    def forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels), dim=-1)

    def forward_texts(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = inputs["input_ids"]
        if self.exact_short_text:
            return F.normalize(self._text.forward_truncated(tokens), dim=-1)
        return F.normalize(self.model.encode_text(tokens), dim=-1)

    @property
    def image_tower(self) -> nn.Module:
        return self.model.visual

    @property
    def text_tower(self) -> nn.Module:
        return self._text.owner if self._text.owner is not self.model else self._text.transformer

    def image_blocks(self) -> list[nn.Module]:
        visual = self.model.visual
        if hasattr(visual, "transformer"):
            return list(visual.transformer.resblocks)
        if hasattr(visual, "trunk") and hasattr(visual.trunk, "blocks"):  # timm towers
            return list(visual.trunk.blocks)
        if all(hasattr(visual, f"layer{i}") for i in range(1, 5)):  # ModifiedResNet (RN50, ...)
            return [block for i in range(1, 5) for block in getattr(visual, f"layer{i}")]
        from fsclip.errors import AdapterError

        raise AdapterError(f"cannot find the blocks of {self.spec!r}'s image tower ({type(visual).__name__})")

    def attention_target_modules(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj"]

    def split_attention(self) -> None:
        # open_clip's blocks fuse q, k, v into one in_proj_weight, which PEFT can only adapt as a whole
        def convert(m):
            if isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim:
                return SplitQKVAttention(m)
            return None

        _replace_modules(self.model, convert)

    def fuse_attention(self, model: nn.Module) -> nn.Module:
        return _replace_modules(model, lambda m: m.fused() if isinstance(m, SplitQKVAttention) else None)

    def text_token_embedding(self) -> nn.Module | None:
        return self._text.token_embedding

    def image_projection(self) -> str | None:
        visual = self.model.visual
        return "visual.proj" if hasattr(visual, "transformer") and isinstance(visual.proj, nn.Parameter) else None

    def forward_image_pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        # the tower's own forward with the final projection left out (`proj` None is its no-projection case)
        return torch.func.functional_call(self.model.visual, {"proj": None}, (pixels,))

    def project_image(self, pooled: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return pooled @ weight  # (N, W) @ (W, D) -> (N, D)


def _precision(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


register_backend(OpenClipBackend)
