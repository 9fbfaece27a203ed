"""`OrtBackend`: a loaded torch backend whose towers run in ONNX Runtime.

Everything but the towers' forward passes (capabilities, preprocessing, tokenizing, logit scale,
fingerprint, the towers' modules themselves) is the wrapped backend's, so code written against `Backend`
runs unchanged. Each is delegated by name: `Backend` defines them all, so `__getattr__` never sees them.
An image-only model has no text session. Its own head runs on the image graph's `pooled` output where
the export found it to be one linear layer on those features (`fsclip.runtime.export`); any other head
runs in torch, on the wrapped model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from fsclip.backends.base import Backend
from fsclip.errors import UsageError
from fsclip.runtime.export import IMAGE_FILE, TEXT_FILE
from fsclip.runtime.session import get_session

__all__ = ["OrtBackend"]


class OrtBackend(Backend):
    """`base`'s towers from the ONNX models in `folder`; inference only (no gradients)."""

    def __init__(self, base: Backend, runtime: str, folder: Path, gate: dict | None = None):
        super().__init__(base.spec, base.model, base.device, base.dtype)
        self.base = base
        self.name = base.name
        self.runtime = runtime
        self.folder = Path(folder)
        self.gate = gate  # what the accuracy gate measured (GateResult.to_dict), None while gating
        self._open_sessions()

    def _open_sessions(self) -> None:
        self._image = get_session(self.folder / IMAGE_FILE)
        self._text = get_session(self.folder / TEXT_FILE) if self.base.has_text else None
        self._text_inputs = [i.name for i in self._text.get_inputs()] if self._text is not None else []
        self._image_outputs = [o.name for o in self._image.get_outputs()]

    def __getstate__(self) -> dict:
        # sessions do not pickle; they are rebuilt from the model files (copies, other processes)
        return {k: v for k, v in self.__dict__.items() if k not in ("_image", "_text")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open_sessions()

    def __getattr__(self, name: str):
        # backend-specific extras (model_type, ...) come from the wrapped backend
        if name.startswith("__") or name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    # -- what the model can do: the wrapped backend's
    @property
    def has_text(self) -> bool:
        return self.base.has_text

    @property
    def has_own_head(self) -> bool:
        return self.base.has_own_head

    def own_head_labels(self) -> list[str]:
        return self.base.own_head_labels()

    def own_head_linear(self) -> nn.Linear | None:
        return self.base.own_head_linear()

    @property
    def own_head_in_runtime(self) -> bool:
        """True where the own head reads this runtime's pooled features; False where it runs in torch."""
        return "pooled" in self._image_outputs

    # -- what the model is: the wrapped backend's
    @property
    def transform(self):
        return self.base.transform

    @property
    def decode_size(self) -> int:
        return self.base.decode_size

    @property
    def fingerprint(self) -> str:
        return self.base.fingerprint

    @property
    def embed_dim(self) -> int:
        return self.base.embed_dim

    @property
    def loss_kind(self) -> Literal["softmax", "sigmoid"]:
        return self.base.loss_kind

    @property
    def exact_short_text(self) -> bool:
        return self.base.exact_short_text

    def _logit_scale_param(self) -> torch.Tensor:
        return self.base._logit_scale_param()

    def _logit_bias_param(self) -> torch.Tensor | None:
        return self.base._logit_bias_param()

    @property
    def image_size(self) -> int:
        return self.base.image_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.base.preprocess(image)

    def tokenize(self, texts) -> dict[str, torch.Tensor]:
        return self.base.tokenize(texts)

    # -- the towers, in ONNX Runtime
    def _inference_only(self) -> UsageError:
        return UsageError(f"runtime {self.runtime} is for inference only; training the towers (LoRA, "
                          "fine-tuning, prompt learning) needs --runtime torch")

    def _no_grad(self) -> None:
        if torch.is_grad_enabled():
            raise self._inference_only()

    # -- what adapters that train the towers ask for: not here
    def split_attention(self) -> None:
        raise self._inference_only()

    def fuse_attention(self, model: nn.Module) -> nn.Module:
        raise self._inference_only()

    def text_token_embedding(self) -> nn.Module | None:
        raise self._inference_only()

    def image_projection(self) -> str | None:
        raise self._inference_only()

    def forward_image_pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        raise self._inference_only()

    def project_image(self, pooled: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise self._inference_only()

    def reset_weights(self) -> None:  # training from scratch
        raise self._inference_only()

    def _run_image(self, pixels: torch.Tensor, output: str) -> torch.Tensor:
        self._no_grad()
        x = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self._image.run([output], {"pixels": x})[0])

    def forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run_image(pixels, "features")

    def forward_pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.own_head_in_runtime:
            return self.base.forward_pooled(pixels)  # torch
        return self._run_image(pixels, "pooled")

    def forward_own_head(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.own_head_in_runtime:  # a head that is not one linear layer on the pooled features
            return self.base.forward_own_head(pixels)
        return self.own_head_linear()(self._run_image(pixels, "pooled"))  # (N, D) @ (D, C) -> (N, C)

    def forward_texts(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._text is None:
            raise self._text_missing()
        self._no_grad()
        feeds = {k: np.ascontiguousarray(inputs[k].detach().cpu().numpy().astype(np.int64))
                 for k in self._text_inputs}
        return torch.from_numpy(self._text.run(None, feeds)[0])

    @property
    def image_tower(self) -> nn.Module:
        return self.base.image_tower

    @property
    def text_tower(self) -> nn.Module:
        return self.base.text_tower

    def image_blocks(self) -> list[nn.Module]:
        return self.base.image_blocks()

    def attention_target_modules(self) -> list[str]:
        return self.base.attention_target_modules()

    def __repr__(self) -> str:
        return f"OrtBackend(spec={self.spec!r}, runtime={self.runtime!r})"
