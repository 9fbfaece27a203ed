"""The contract every adapter honours: fit / predict_proba / save / load.

An adapter folder (PEFT's layout is the model):
    adapter_config.json        method, classes, config, selected hyper-parameters, fsclip version and
                               the base model's spec and fingerprint
    adapter_model.safetensors  the method's weights only (never the base model)
    metrics.json               validation accuracy of zero-shot vs the adapter, calibration, timings
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fsclip._io import atomic_dir
from fsclip._version import __version__
from fsclip.adapters._budget import Budget
from fsclip.adapters._costs import Costs
from fsclip.adapters._features import encode_items
from fsclip.adapters.config import AdapterConfig
from fsclip.backends import Backend
from fsclip.data import LabeledImages
from fsclip.errors import AdapterError, UsageError

__all__ = ["CONFIG_FILE", "METRICS_FILE", "WEIGHTS_FILE", "Adapter", "BaseModel", "read_header"]

logger = logging.getLogger(__name__)

FORMAT = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METRICS_FILE = "metrics.json"

Item = str | os.PathLike | Image.Image


@dataclass(frozen=True)
class BaseModel:
    """Which model an adapter was fitted on: enough to reload it and to refuse another one."""

    spec: str
    backend: str
    fingerprint: str
    dtype: str

    @classmethod
    def of(cls, backend: Backend) -> BaseModel:
        # a folder spec is stored absolute, so the adapter still finds it from another working directory
        spec = str(Path(backend.spec).resolve()) if os.path.isdir(backend.spec) else backend.spec
        return cls(spec, backend.name, backend.fingerprint, str(backend.dtype).removeprefix("torch."))


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `adapter_config.json` of an adapter folder, or a one-line `AdapterError`."""
    file = Path(path) / CONFIG_FILE
    try:
        header = json.loads(file.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{str(path)!r} is not an fsclip adapter folder (no {CONFIG_FILE})") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(header, dict) or "method" not in header or "base_model" not in header:
        raise AdapterError(f"{file} is not an fsclip adapter config (no method or base_model)")
    if header.get("format", 0) > FORMAT:
        raise AdapterError(
            f"{str(path)!r} was written by fsclip {header.get('fsclip_version')} (format {header['format']}); "
            f"this is fsclip {__version__}, upgrade to load it"
        )
    return header


class Adapter(ABC):
    """A classifier over `classes` adapted from a CLIP-style model.

    `backend` is the model whose image features the adapter scores: the base model for frozen-feature
    methods, an adapted copy for methods that train the towers (LoRA, fine-tuning). Either way
    `proba_from_features(backend.encode_images(...))` is the prediction, so `fsclip.predict` can drive it.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[AdapterConfig]]
    frozen_backbone: ClassVar[bool] = True  # True: image features are the base model's (cacheable)

    def __init__(self, backend: Backend, classes: Sequence[str], config: AdapterConfig, base: BaseModel | None = None):
        self.backend = backend
        self.classes = tuple(classes)
        self.config = config
        self.base = base or BaseModel.of(backend)
        self.temperature = 1.0
        self.metrics: dict[str, Any] = {}
        # what fitting chose and from which data, e.g. {"C": 10.0, "chosen by": "5-fold cross-validation ..."}
        self.selection: dict[str, Any] = {}
        self.validation_uses: list[str] = []  # what `fit` spent the validation images on (e.g. early stopping)

    # -- fitting
    @classmethod
    def needs_text(cls, config: AdapterConfig) -> bool:
        """Whether fitting with `config` needs the model's text tower (class-name prompts)."""
        return True

    @classmethod
    def unsupported(cls, backend: Backend) -> str | None:
        """Why this method (with its default config) cannot run on `backend`, or None when it can."""
        if cls.needs_text(cls.config_class()) and not getattr(backend, "has_text", True):
            return f"needs a text tower, and {backend.spec!r} has none"
        return None

    @classmethod
    def default_seconds(cls, costs: Costs) -> float:
        """Estimated seconds of a fit with the default schedule (no budget cut): here, encoding the images."""
        return costs.images * costs.image_seconds

    @classmethod
    def finish_seconds(cls, costs: Costs, val_images: int, prompts: int) -> float:
        """Estimated seconds after training: encoding the validation images with an adapted image tower
        (frozen-feature methods read them from the cache). `prompts`: class prompts of the zero-shot ensemble."""
        return 0.0 if cls.frozen_backbone else val_images * costs.image_seconds

    @classmethod
    @abstractmethod
    def fit(
        cls, backend: Backend, train: LabeledImages, val: LabeledImages, config: AdapterConfig, progress: bool = False,
        budget: Budget | None = None,
    ) -> Adapter:
        """Fit on `train` within `budget` (None: no limit); never modifies `backend`.

        `val` is for reporting: a method may use it only where its config asks (early stopping) and
        then records that in `validation_uses`.
        """

    # -- prediction
    @abstractmethod
    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) normalised image features from `self.backend` -> (N, C) uncalibrated logits."""

    def proba_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (N, C) calibrated class probabilities (softmax of logits / temperature)."""
        return (self.logits_from_features(features) / self.temperature).softmax(dim=-1)

    def encode(self, images: Sequence[Item], progress: bool = False, batch_size: int = 32) -> torch.Tensor:
        """(N, D) features of `images` (paths or PIL) from `self.backend`; a `DataError` names unreadable files."""
        return encode_items(self.backend, images, cache=self.frozen_backbone, progress=progress,
                            batch_size=batch_size, what="image")

    @torch.inference_mode()
    def predict_proba(self, images: Sequence[Item], batch_size: int = 32) -> torch.Tensor:
        """(N, C) calibrated probabilities for image paths or PIL images, on the CPU."""
        return self.proba_from_features(self.encode(images, batch_size=batch_size)).float().cpu()

    # -- persistence
    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's own weights (what goes into safetensors)."""

    def extra_state(self) -> dict[str, Any]:
        """JSON-serialisable fitted values that are not tensors (e.g. selected alpha, beta)."""
        return {}

    @classmethod
    @abstractmethod
    def from_state(
        cls, backend: Backend, classes: Sequence[str], config: AdapterConfig, tensors: dict[str, torch.Tensor],
        extra: dict[str, Any], base: BaseModel,
    ) -> Adapter:
        """Rebuild a fitted adapter on the base model `backend` from what `save` wrote."""

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the adapter folder atomically: readers see the old folder or the complete new one."""
        header = {
            "format": FORMAT,
            "fsclip_version": __version__,
            "method": self.name,
            "base_model": dataclasses.asdict(self.base),
            "classes": list(self.classes),
            "config": self.config.to_dict(),
            "state": {"temperature": self.temperature, "selection": self.selection, **self.extra_state()},
        }
        tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
                   for k, v in self.state_dict().items()}
        meta = {"fsclip_version": __version__, "method": self.name, "base_fingerprint": self.base.fingerprint}
        try:
            with atomic_dir(path, overwrite=overwrite) as tmp:
                save_file(tensors, tmp / WEIGHTS_FILE, metadata=meta)
                (tmp / CONFIG_FILE).write_text(json.dumps(header, indent=2, ensure_ascii=False) + "\n")
                (tmp / METRICS_FILE).write_text(json.dumps(self.metrics, indent=2, ensure_ascii=False) + "\n")
        except FileExistsError:
            raise UsageError(f"{str(path)!r} already exists; choose another folder or overwrite it") from None
        logger.info("saved %s adapter to %s", self.name, path)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, backend: Backend) -> Adapter:
        """Load an adapter folder onto `backend`, which must be the model it was fitted on."""
        header = read_header(path)
        if header["method"] != cls.name:
            raise AdapterError(f"{str(path)!r} holds a {header['method']!r} adapter, not {cls.name!r}")
        base = BaseModel(**header["base_model"])
        if base.fingerprint != backend.fingerprint:
            raise AdapterError(
                f"adapter {str(path)!r} was fitted on model {base.spec!r} (fingerprint {base.fingerprint}), "
                f"not on {backend.spec!r} (fingerprint {backend.fingerprint}); load it with its own base model"
            )
        try:
            config = cls.config_class.from_dict(header["config"])
        except ValueError as e:
            raise AdapterError(f"{str(path)!r}: invalid config: {e}") from None
        try:
            tensors = load_file(Path(path) / WEIGHTS_FILE)
        except FileNotFoundError:
            raise AdapterError(f"{str(path)!r} has no {WEIGHTS_FILE}") from None
        state = dict(header.get("state", {}))
        temperature = float(state.pop("temperature", 1.0))
        selection = state.pop("selection", {})
        adapter = cls.from_state(backend, header["classes"], config, tensors, state, base)
        adapter.temperature = temperature
        adapter.selection = selection
        metrics_file = Path(path) / METRICS_FILE
        adapter.metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        return adapter

    def __repr__(self) -> str:
        return f"{type(self).__name__}(classes={len(self.classes)}, base={self.base.spec!r})"
