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
import math
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
from fsclip._outputs import check_output
from fsclip._version import __version__
from fsclip.adapters._budget import Budget
from fsclip.adapters._costs import Costs
from fsclip.adapters._features import encode_items
from fsclip.adapters.config import AdapterConfig
from fsclip.backends import Backend
from fsclip.data import LabeledImages
from fsclip.errors import AdapterError, UsageError

__all__ = ["CONFIG_FILE", "METRICS_FILE", "WEIGHTS_FILE", "Adapter", "BaseModel", "is_adapter_folder", "read_header"]

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


def _load_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise AdapterError(f"{file} is not valid JSON: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{file} is not valid JSON: {e}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_header(header: Any, file: Path) -> dict[str, Any]:
    """Every field `load` relies on, with the type it needs: a hand-edited or damaged config is one line."""
    if not isinstance(header, dict) or "method" not in header or "base_model" not in header:
        raise AdapterError(f"{file} is not an fsclip adapter config (no method or base_model)")
    fmt = header.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise AdapterError(f"{file}: unknown format {fmt!r} (this fsclip writes format {FORMAT})")
    if fmt > FORMAT:
        raise AdapterError(f"{file} was written by fsclip {header.get('fsclip_version')} (format {fmt}); "
                           f"this is fsclip {__version__}, upgrade to load it")
    if not isinstance(header["method"], str):
        raise AdapterError(f"{file}: method must be a name, got {header['method']!r}")
    base = header["base_model"]
    if not isinstance(base, dict):
        raise AdapterError(f"{file}: base_model must be an object, got {base!r}")
    for key in (f.name for f in dataclasses.fields(BaseModel)):
        if not isinstance(base.get(key), str) or not base[key]:
            raise AdapterError(f"{file}: base_model.{key} is missing or not a string")
    classes = header.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        raise AdapterError(f"{file}: classes must be a list of at least 2 names")
    if len(set(classes)) != len(classes):
        raise AdapterError(f"{file}: classes has duplicates: "
                           f"{', '.join(sorted({c for c in classes if classes.count(c) > 1}))}")
    if not isinstance(header.get("config"), dict) or not isinstance(header.get("state", {}), dict):
        raise AdapterError(f"{file}: config and state must be objects")
    t = header.get("state", {}).get("temperature", 1.0)
    if not _is_number(t) or not math.isfinite(t) or t <= 0:
        raise AdapterError(f"{file}: temperature must be a finite number > 0, got {t!r}")
    return header


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The validated `adapter_config.json` of an adapter folder, or a one-line `AdapterError`."""
    folder = Path(path)
    if not folder.is_dir():
        if folder.exists():
            raise AdapterError(f"{str(path)!r} is a file; give the adapter folder that `fsclip fit --out` wrote")
        raise AdapterError(f"adapter folder {str(path)!r} not found")
    file = folder / CONFIG_FILE
    try:
        header = _load_json(file)
    except FileNotFoundError:
        raise AdapterError(f"{str(path)!r} is not an fsclip adapter folder (no {CONFIG_FILE})") from None
    except OSError as e:
        raise AdapterError(f"cannot read {file}: {e.strerror or e}") from None
    return _check_header(header, file)


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding an fsclip adapter config, even a damaged one (what `--overwrite` may
    replace); PEFT's own `adapter_config.json` has no `base_model`."""
    try:
        header = _load_json(Path(path) / CONFIG_FILE)
    except (OSError, AdapterError):
        return False
    return isinstance(header, dict) and "method" in header and "base_model" in header and "fsclip_version" in header


def _read_metrics(file: Path) -> dict[str, Any]:
    """`metrics.json`, or {} with a warning: it reports the fit and is never needed to predict."""
    try:
        metrics = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("ignoring %s: %s", file, e)
        return {}
    if not isinstance(metrics, dict):
        logger.warning("ignoring %s: not a JSON object", file)
        return {}
    return metrics


class Adapter(ABC):
    """A classifier over `classes` adapted from a CLIP-style model.

    `backend` is the model whose image features the adapter scores: the base model for frozen-feature
    methods, an adapted copy for methods that train the towers (LoRA, fine-tuning). Either way
    `proba_from_features(backend.encode_images(...))` is the prediction, so `fsclip.predict` can drive it.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[AdapterConfig]]
    frozen_backbone: ClassVar[bool] = True  # True: image features are the base model's (cacheable)
    trains_text: ClassVar[bool] = False  # True: fitting backpropagates through the text tower

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

    @property
    def temperature(self) -> float:
        """Softmax temperature from calibration: always a finite number > 0 (0 would give NaN scores, a
        negative one would invert the ranking)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise AdapterError(f"temperature must be a finite number > 0, got {value}")
        self._temperature = value

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
        check_output(path, "adapter folder", is_adapter_folder, overwrite=overwrite)
        try:  # strict JSON: a NaN would make the files unreadable to every other JSON parser
            config_text = json.dumps(header, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
            metrics_text = json.dumps(self.metrics, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        except ValueError:
            raise AdapterError(f"not saving {self.name} adapter: its state or metrics contain NaN or infinity "
                               f"({self.metrics.get('val_accuracy')}); the fit diverged") from None
        try:
            with atomic_dir(path, overwrite=overwrite) as tmp:
                save_file(tensors, tmp / WEIGHTS_FILE, metadata=meta)
                (tmp / CONFIG_FILE).write_text(config_text, encoding="utf-8")
                (tmp / METRICS_FILE).write_text(metrics_text, encoding="utf-8")
        except FileExistsError:
            raise UsageError(f"{str(path)!r} already exists; choose another folder or overwrite it") from None
        logger.info("saved %s adapter to %s", self.name, path)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, backend: Backend) -> Adapter:
        """Load an adapter folder onto `backend`, which must be the model it was fitted on.

        Everything is checked before use; a damaged or hand-edited folder is an `AdapterError` naming the
        file and what is wrong. `metrics.json` is informational: a damaged one only logs a warning.
        """
        header = read_header(path)
        folder = Path(path)
        if header["method"] != cls.name:
            raise AdapterError(f"{str(path)!r} holds a {header['method']!r} adapter, not {cls.name!r}")
        base = BaseModel(**{f.name: header["base_model"][f.name] for f in dataclasses.fields(BaseModel)})
        if not backend.matches_fingerprint(base.fingerprint):
            what = (f"other weights of {base.spec!r}" if base.spec == backend.spec
                    else f"model {base.spec!r}, not on {backend.spec!r}")
            raise AdapterError(
                f"adapter {str(path)!r} was fitted on {what} (fingerprint {base.fingerprint} then, "
                f"{backend.fingerprint} now); load it with its own base model"
            )
        try:
            config = cls.config_class.from_dict(header["config"])
        except (ValueError, TypeError) as e:
            raise AdapterError(f"{folder / CONFIG_FILE}: invalid config: {e}") from None
        weights = folder / WEIGHTS_FILE
        try:
            tensors = load_file(weights)
        except FileNotFoundError:
            raise AdapterError(f"{str(path)!r} has no {WEIGHTS_FILE}") from None
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for torn files
            raise AdapterError(f"{weights} is damaged (truncated or not safetensors): {e}") from None
        bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
        if bad:
            raise AdapterError(f"{weights} is damaged: tensor(s) {', '.join(bad)} hold NaN or infinity")
        state = dict(header.get("state", {}))
        temperature = state.pop("temperature", 1.0)
        selection = state.pop("selection", {})
        classes = header["classes"]
        try:
            adapter = cls.from_state(backend, classes, config, tensors, state, base)
            with torch.inference_mode():  # one probe: the weights must score exactly the listed classes
                probe = adapter.logits_from_features(torch.zeros(1, backend.embed_dim, device=backend.device))
        except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as e:
            if isinstance(e, AdapterError):
                raise
            raise AdapterError(f"{weights} does not fit {CONFIG_FILE} ({len(classes)} classes): "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if tuple(probe.shape) != (1, len(classes)):
            raise AdapterError(f"{folder / CONFIG_FILE} lists {len(classes)} classes but {WEIGHTS_FILE} scores "
                               f"{probe.shape[-1]}; the class list was edited or the files are from different fits")
        adapter.temperature = temperature
        adapter.selection = selection
        adapter.metrics = _read_metrics(folder / METRICS_FILE)
        return adapter

    def __repr__(self) -> str:
        return f"{type(self).__name__}(classes={len(self.classes)}, base={self.base.spec!r})"
