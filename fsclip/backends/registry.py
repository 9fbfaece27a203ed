"""Backend registry and model-spec resolution.

Spec syntax (see README, "Model specs"):
    shapes                          the bundled shapes-world model
    PATH                            a folder: open_clip local-dir (open_clip_config.json) or transformers (config.json)
    ARCH@TAG                        open_clip built-in with a pretrained tag, e.g. ViT-B-32@laion2b_s34b_b79k
    open_clip:ARCH[@TAG] | open_clip:PATH
    hf-hub:ORG/REPO                 open_clip model on the Hugging Face hub
    hf:ORG/REPO | hf:PATH | ORG/REPO   transformers CLIP / SigLIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fsclip.errors import ModelLoadError, UsageError

__all__ = ["ResolvedSpec", "list_backends", "register_backend", "resolve_spec"]

_BACKENDS: dict[str, type] = {}
BUNDLED = {"shapes": Path(__file__).resolve().parent.parent / "assets" / "shapes-clip"}


def register_backend(cls: type) -> type:
    if cls.name in _BACKENDS:
        raise ValueError(f"backend {cls.name!r} is already registered")
    _BACKENDS[cls.name] = cls
    return cls


def list_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> type:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise UsageError(f"unknown backend {name!r}; choose one of: {', '.join(list_backends())}") from None


@dataclass(frozen=True)
class ResolvedSpec:
    backend: str
    target: str  # what the backend's loader receives
    pretrained: str | None = None


def _detect_dir(path: Path, spec: str) -> ResolvedSpec:
    if (path / "open_clip_config.json").is_file():
        return ResolvedSpec("open_clip", f"local-dir:{path}")
    if (path / "config.json").is_file():
        return ResolvedSpec("transformers", str(path))
    raise ModelLoadError(
        f"model folder {spec!r} has neither open_clip_config.json (open_clip local-dir) "
        "nor config.json (transformers)"
    )


def resolve_spec(spec: str) -> ResolvedSpec:
    """Map a model spec string to a backend and what its loader takes."""
    spec = spec.strip()
    if not spec:
        raise UsageError("empty model spec")
    if spec in BUNDLED:
        return _detect_dir(BUNDLED[spec], spec)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ("open_clip", "openclip"):
        if os.path.isdir(rest):
            return ResolvedSpec("open_clip", f"local-dir:{Path(rest).resolve()}")
        arch, _, tag = rest.partition("@")
        return ResolvedSpec("open_clip", arch, tag or None)
    if sep and prefix == "hf-hub":
        return ResolvedSpec("open_clip", spec)
    if sep and prefix in ("hf", "transformers"):
        return ResolvedSpec("transformers", str(Path(rest).resolve()) if os.path.isdir(rest) else rest)
    if os.path.isdir(spec):
        return _detect_dir(Path(spec).resolve(), spec)
    if "@" in spec:
        arch, _, tag = spec.partition("@")
        return ResolvedSpec("open_clip", arch, tag)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return ResolvedSpec("transformers", spec)
    import open_clip

    if spec in open_clip.list_models():
        return ResolvedSpec("open_clip", spec, None)
    raise ModelLoadError(
        f"cannot resolve model spec {spec!r}: not a folder, not ARCH@TAG (e.g. ViT-B-32@laion2b_s34b_b79k), "
        "not ORG/REPO (transformers) nor hf-hub:ORG/REPO (open_clip); the bundled model is 'shapes'"
    )
