"""The one interface every model backend implements."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import ClassVar, Literal

import torch
from PIL import Image
from torch import nn

from fsclip._cache import cache_dir
from fsclip._io import atomic_write
from fsclip.errors import UsageError

__all__ = ["Backend", "no_text_tower"]


def no_text_tower(spec: str, instead: str = "train a classifier on labelled images with `fsclip fit`") -> str:
    """The one line every text-needing path gives for an image-only model, with what to do `instead`."""
    return f"model {spec!r} has no text tower; {instead}"

logger = logging.getLogger(__name__)

_SAMPLES = 64  # values hashed per tensor


def _samples(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
    """Per state-dict entry: its shape and a strided sample of up to 64 values, as fp32 on the CPU."""
    out = {}
    for key, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES)
        out[key] = (tuple(tensor.shape), flat[::step][:_SAMPLES].to("cpu", torch.float32).contiguous())
    return out


def _digest(samples: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for key in sorted(samples):
        shape, values = samples[key]
        h.update(f"{key}:{shape}".encode())
        h.update(values.numpy().tobytes())
    return h.hexdigest()[:16]


class Backend(ABC):
    """A vision model behind a small, uniform surface: an image tower always, a text tower where
    `has_text` (CLIP-style image-text models), its own classification head where `has_own_head`.

    Commands ask these capabilities, never the class. The text methods of an image-only model raise a
    one-line `UsageError`. `encode_*` run in eval mode without gradients and return L2-normalised
    float32 features on the CPU-or-model device; `forward_*` keep gradients for adapters that train
    the towers.
    """

    name: ClassVar[str]
    runtime: ClassVar[str] = "torch"  # what runs the towers' inference; see `fsclip.runtime`

    def __init__(self, spec: str, model: nn.Module, device: torch.device, dtype: torch.dtype):
        self.spec = spec
        self.model = model
        self.device = device
        self.dtype = dtype
        # the weights as loaded in low precision: `fingerprint` looks up their fp32 hash only while unchanged
        low = any(t.is_floating_point() and t.dtype != torch.float32 for t in model.state_dict().values())
        self._loaded_digest = _digest(_samples(model)) if low else None

    # -- what the model can do
    @property
    def has_text(self) -> bool:
        """True for image-text models: zero-shot classification and text queries work."""
        return True

    @property
    def has_own_head(self) -> bool:
        """True where the model carries its own classifier (e.g. an ImageNet head) and its class names."""
        return False

    def own_head_labels(self) -> list[str]:
        """Class names of the model's own head, in logit order."""
        raise UsageError(f"model {self.spec!r} has no classification head of its own")

    def forward_own_head(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, C) logits of the model's own head, with gradients."""
        raise UsageError(f"model {self.spec!r} has no classification head of its own")

    def own_head_linear(self) -> nn.Linear | None:
        """The own head where it is one linear layer on `forward_pooled` (so a runtime that computes the
        pooled features can apply it); None where the head is anything else, or there is none."""
        return None

    def _text_missing(self) -> UsageError:
        return UsageError(no_text_tower(self.spec))

    # -- what the model is
    @property
    @abstractmethod
    def embed_dim(self) -> int: ...

    @property
    def loss_kind(self) -> Literal["softmax", "sigmoid"]:
        """`softmax` for CLIP-style contrastive models, `sigmoid` for SigLIP."""
        raise self._text_missing()

    @property
    def exact_short_text(self) -> bool:
        """True where encoding only up to the longest real sequence is exact (causal text tower)."""
        raise self._text_missing()

    @property
    def logit_scale(self) -> float:
        return float(self._logit_scale_param().exp())

    @property
    def logit_bias(self) -> float | None:
        bias = self._logit_bias_param()
        return None if bias is None else float(bias)

    def _logit_scale_param(self) -> torch.Tensor:
        raise self._text_missing()

    def _logit_bias_param(self) -> torch.Tensor | None:
        return None

    @cached_property
    def fingerprint(self) -> str:
        """Short hash of the weights as stored: names, shapes and a strided sample of every tensor, in fp32.

        The same weights loaded in fp32, fp16 or bf16 have one fingerprint, so indexes, caches and
        adapters move between a CPU (fp32) and a GPU (fp16). Low precision cannot give back the fp32
        values, so a model loaded in fp16/bf16 is reloaded once in fp32 on the CPU and compared sample by
        sample (rounded to the loaded dtypes); the answer is remembered on disk per weights and dtype.
        Weights changed after loading (an adapted copy) hash as they are.
        """
        samples = _samples(self.model)
        direct = _digest(samples)
        if self._loaded_digest is None or direct != self._loaded_digest:
            return direct  # fp32 already, or weights changed since loading
        memo = cache_dir("fingerprints") / f"{direct}.txt"
        with contextlib.suppress(OSError, UnicodeDecodeError):
            known = memo.read_text(encoding="ascii").strip()
            if re.fullmatch(r"[0-9a-f]{16}", known):
                return known
        found = self._stored_fingerprint(samples) or direct
        with contextlib.suppress(OSError), atomic_write(memo, "w") as f:
            f.write(found + "\n")
        return found

    def _stored_fingerprint(self, samples: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> str | None:
        """The fp32 fingerprint of `self.spec`, if its fp32 weights round to exactly what is loaded here."""
        from fsclip.backends import load_model

        logger.info("fingerprinting %s: reloading it once in fp32 on the CPU", self.spec)
        try:
            reference = load_model(self.spec, device="cpu", dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - any failure only costs the dtype independence
            logger.warning("cannot reload %s in fp32 to fingerprint its stored weights (%s); its fingerprint "
                           "depends on the dtype %s", self.spec, e, self.dtype)
            return None
        loaded = {k: v.dtype for k, v in self.model.state_dict().items()}
        ref = _samples(reference.model)
        if ref.keys() != samples.keys() or any(ref[k][0] != samples[k][0] for k in ref):
            return None
        for key, (_, values) in ref.items():
            rounded = values.to(loaded[key]).to(torch.float32) if loaded[key].is_floating_point else values
            if not torch.equal(rounded, samples[key][1]):
                return None
        return reference.fingerprint

    def matches_fingerprint(self, recorded: str) -> bool:
        """True when `recorded` (from an index, adapter or result) names these weights: the fingerprint, or
        the dtype-dependent one fsclip 0.1.0 recorded for a model loaded in fp16/bf16."""
        return recorded in (self.fingerprint, _digest(_samples(self.model)))

    @property
    def features_id(self) -> str:
        """Names the features `encode_*` compute, for caches: the weights, the dtype, and the runtime
        unless torch (fp16 or int8 features must never stand in for fp32 ones)."""
        tag = f"{self.name}-{self.fingerprint}-{str(self.dtype).removeprefix('torch.')}"
        return tag if self.runtime == "torch" else f"{tag}-{self.runtime}"

    # -- inputs
    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, H, W) float tensor, exactly as the model was trained."""

    @property
    @abstractmethod
    def image_size(self) -> int: ...

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """`preprocess` as a picklable callable for worker processes; backends return one that holds no
        weights (this default pickles the whole backend)."""
        return self.preprocess

    @property
    def decode_size(self) -> int:
        """Smallest image side `preprocess` reads without upsampling (JPEG draft decoding stops there):
        the resize before the centre crop, which is larger than `image_size` when crop_pct < 1."""
        return self.image_size

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> model inputs, padded to the length `forward_texts` needs (short where exact)."""
        raise self._text_missing()

    # -- differentiable forwards (normalised features)
    @abstractmethod
    def forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D), normalised, with gradients."""

    def forward_pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D) image features before `forward_images` L2-normalises them, with gradients;
        image-only backbones, where these are what a classification head reads."""
        raise UsageError(f"model {self.spec!r} does not expose its pooled image features")

    def forward_texts(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tokenised texts -> (N, D), normalised, with gradients."""
        raise self._text_missing()

    # -- towers, for adapters that train parts of them
    @property
    @abstractmethod
    def image_tower(self) -> nn.Module: ...

    @property
    def text_tower(self) -> nn.Module:
        raise self._text_missing()

    @abstractmethod
    def image_blocks(self) -> list[nn.Module]:
        """The image tower's residual blocks (transformers) or stages (CNNs), first to last."""

    @abstractmethod
    def attention_target_modules(self) -> list[str]:
        """Module-name suffixes that LoRA should wrap in the towers' attention (after `split_attention`)."""

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

    def reset_weights(self) -> None:
        """Re-initialise every weight of `self.model` at random, in place: the same architecture untrained.

        Only for a private copy of the model (training from scratch). Seeded by torch's global RNG.
        Backends whose library has its own initialisation scheme use it; this default resets every
        module that can (`reset_parameters`: convolutions, linear layers, norms with their running
        statistics, embeddings) and draws the weights no module owns that way (class tokens, position
        embeddings, projections) from N(0, 0.02) truncated at 2 std; 1-D scales get ones, biases zeros.
        """
        reset: set[int] = set()
        for module in self.model.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
                reset.update(id(p) for p in module.parameters(recurse=False))
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if id(p) in reset:
                    continue
                if p.ndim >= 2 or "embed" in name or "token" in name:
                    nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)
                else:
                    nn.init.ones_(p)
        self.__dict__.pop("fingerprint", None)

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
        return self._batched(self.forward_images, pixels, batch_size, self.embed_dim)

    @torch.inference_mode()
    def encode_own_head(self, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(N, 3, H, W) -> (N, C) float32 logits of the model's own head."""
        width = len(self.own_head_labels())  # a model without a head of its own raises here, in one line
        return self._batched(self.forward_own_head, pixels, batch_size, width)

    def _batched(self, forward, pixels: torch.Tensor, batch_size: int, width: int) -> torch.Tensor:
        self.model.eval()
        out = [forward(pixels[i : i + batch_size].to(self.device, self.dtype)).float()
               for i in range(0, len(pixels), batch_size)]
        return torch.cat(out) if out else torch.empty(0, width, device=self.device)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> (N, D) normalised float32 features.

        Batches are formed from texts of similar token length, so that with a causal tower each batch
        is only as long as its own longest text.
        """
        if not self.has_text:
            raise self._text_missing()
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
