"""Backend registry and model-spec resolution.

Spec syntax (see README, "Model specs"):
    shapes | shapes-resnet          the bundled shapes-world CLIP | image-only CNN
    PATH                            a folder: open_clip local-dir (open_clip_config.json), timm hub layout
                                    (config.json with "architecture") or transformers (other config.json)
    ARCH@TAG                        open_clip built-in with a pretrained tag, e.g. ViT-B-32@laion2b_s34b_b79k
    open_clip:ARCH[@TAG] | open_clip:PATH
    timm:NAME[.TAG] | timm:PATH | timm:hf-hub:ORG/REPO   timm image model, e.g. timm:resnet50.a1_in1k
    hf-hub:ORG/REPO                 a hub repo: timm when its files say so (config.json with "architecture" and
                                    no open_clip_config.json, read from the local cache or, when reachable,
                                    the hub), else open_clip
    hf:ORG/REPO | hf:PATH | ORG/REPO   transformers: CLIP / SigLIP, or an image model (DINOv2, ViT, ResNet, ...)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fsclip.errors import ModelLoadError, UsageError

__all__ = ["ResolvedSpec", "list_backends", "register_backend", "resolve_spec"]

_BACKENDS: dict[str, type] = {}
_ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED = {"shapes": _ASSETS / "shapes-clip", "shapes-resnet": _ASSETS / "shapes-resnet"}


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


def is_timm_config(path: Path) -> bool:
    """A config.json as timm's `save_for_hf` writes it: the architecture at the top level."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("architecture"), str)


def _detect_dir(path: Path, spec: str) -> ResolvedSpec:
    if (path / "open_clip_config.json").is_file():
        return ResolvedSpec("open_clip", f"local-dir:{path}")
    if (path / "config.json").is_file():
        if is_timm_config(path / "config.json"):
            return ResolvedSpec("timm", f"local-dir:{path}")
        return ResolvedSpec("transformers", str(path))
    raise ModelLoadError(
        f"model folder {spec!r} has neither open_clip_config.json (open_clip local-dir) "
        "nor config.json (timm or transformers)"
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
    if sep and prefix == "timm":
        if os.path.isdir(rest):
            return ResolvedSpec("timm", f"local-dir:{Path(rest).resolve()}")
        return ResolvedSpec("timm", rest)
    if sep and prefix == "hf-hub":
        from fsclip.backends._hub import hub_repo_library

        return ResolvedSpec("timm" if hub_repo_library(rest) == "timm" else "open_clip", spec)
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
        "not timm:NAME, not ORG/REPO (transformers) nor hf-hub:ORG/REPO (open_clip or timm); "
        "the bundled models are 'shapes' and 'shapes-resnet'"
    )
