"""Write a model folder that `fsclip.backends.load_model` loads as an ordinary model spec.

One writer per backend, looked up by the backend's registered name. (A `Backend.save_pretrained`
method would be the natural home for this; until the backends grow one, it lives here.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from fsclip._io import atomic_dir
from fsclip._outputs import check_output
from fsclip.backends import Backend
from fsclip.backends.registry import resolve_spec
from fsclip.errors import AdapterError, UsageError

__all__ = ["is_merged_model_folder", "write_model_folder"]

MERGE_NOTE = "fsclip_merge.json"


def _openclip_config(spec: str, model: nn.Module) -> dict:
    target = resolve_spec(spec).target
    if target.startswith("local-dir:"):
        return json.loads(Path(target.removeprefix("local-dir:"), "open_clip_config.json").read_text())
    if target.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(target.removeprefix("hf-hub:"), "open_clip_config.json")).read_text())
    import open_clip

    cfg = open_clip.get_model_config(target)
    if cfg is None:
        raise AdapterError(f"cannot find the open_clip config of {spec!r} to write a merged model")
    preprocess = getattr(model.visual, "preprocess_cfg", None) or {}
    return {"model_cfg": cfg, "preprocess_cfg": dict(preprocess)}


def _write_openclip(backend: Backend, model: nn.Module, folder: Path, note: dict) -> None:
    config = _openclip_config(backend.spec, model)
    config["fsclip"] = {**config.get("fsclip", {}), **note}
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_transformers(backend: Backend, model: nn.Module, folder: Path, note: dict) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    # the backend keeps its processor and tokenizer private; they are what makes the folder loadable
    backend._processor.save_pretrained(folder)
    backend._tokenizer.save_pretrained(folder)
    (folder / MERGE_NOTE).write_text(json.dumps(note, indent=2) + "\n")


def is_merged_model_folder(path: str | os.PathLike) -> bool:
    """True for a model folder `write_model_folder` wrote: its note is in `fsclip_merge.json` (transformers)
    or under the `fsclip` key of `open_clip_config.json`."""
    path = Path(path)
    if (path / MERGE_NOTE).is_file():
        return True
    try:
        config = json.loads((path / "open_clip_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("fsclip"), dict) and "merged_from" in config["fsclip"]


_WRITERS = {"open_clip": _write_openclip, "transformers": _write_transformers}


def write_model_folder(backend: Backend, model: nn.Module, path: str | os.PathLike, note: dict,
                       overwrite: bool = False) -> Path:
    """Save `model` (same architecture as `backend.model`) as a standalone folder of `backend`'s kind."""
    try:
        writer = _WRITERS[backend.name]
    except KeyError:
        raise AdapterError(f"cannot write merged models for backend {backend.name!r}; "
                           f"supported: {', '.join(sorted(_WRITERS))}") from None
    check_output(path, "merged model folder", is_merged_model_folder, overwrite=overwrite)
    try:
        with atomic_dir(path, overwrite=overwrite) as tmp:
            writer(backend, model, tmp, note)
    except FileExistsError:
        raise UsageError(f"{str(path)!r} already exists; choose another folder or overwrite it") from None
    return Path(path)
