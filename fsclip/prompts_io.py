"""Prompt templates: named sets shipped in `prompts/`, user JSON files, or inline strings."""

from __future__ import annotations

import codecs
import json
import os
import stat
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from fsclip.errors import UsageError

__all__ = ["fill", "list_templates", "load_templates", "read_text_file"]

PLACEHOLDER = "{}"


def _bundled() -> dict[str, object]:
    root = resources.files("fsclip.prompts")
    return {p.name[: -len(".json")]: p for p in root.iterdir() if p.name.endswith(".json")}


def list_templates() -> list[str]:
    """Names of the template sets shipped with fsclip."""
    return sorted(_bundled())


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """The text of a small user file (labels, templates): UTF-8, with or without a BOM, or UTF-16 with a
    BOM (what Windows editors save as "Unicode"). Anything else is a one-line `UsageError` naming `what`."""
    path = Path(path)
    name = repr(str(path))
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise UsageError(f"{what} {name} is a folder, not a file")
        if not stat.S_ISREG(mode):  # a FIFO would block the read forever
            raise UsageError(f"{what} {name} is not a regular file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} {name} not found") from None
    except OSError as e:
        raise UsageError(f"{what} {name} cannot be read: {e.strerror or e}") from None
    encoding = "utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "save it as UTF-8") from None
    if "\x00" in text:
        raise UsageError(f"{what} {name} is a binary file, not text")
    return text


def _validate(templates: Sequence[str], where: str) -> list[str]:
    if not templates:
        raise UsageError(f"{where}: no templates")
    for t in templates:
        if not isinstance(t, str) or t.count(PLACEHOLDER) != 1:
            raise UsageError(f"{where}: template {t!r} must contain the placeholder {{}} exactly once")
    return list(templates)


def load_templates(name_or_path: str | Sequence[str] = "imagenet80") -> list[str]:
    """A shipped set by name, a JSON file (`{"templates": [...]}` or a list), or a list of strings."""
    if not isinstance(name_or_path, str):
        return _validate(name_or_path, "templates")
    bundled = _bundled()
    if name_or_path in bundled:
        data = json.loads(bundled[name_or_path].read_text(encoding="utf-8"))
        return _validate(data["templates"], name_or_path)
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        try:
            data = json.loads(read_text_file(path, "template file"))
        except json.JSONDecodeError as e:
            raise UsageError(f"template file {str(path)!r} is not valid JSON: {e}") from None
        templates = data.get("templates") if isinstance(data, dict) else data
        if not isinstance(templates, list):
            raise UsageError(f"template file {str(path)!r} must hold a list or {{\"templates\": [...]}}")
        return _validate(templates, str(path))
    raise UsageError(
        f"unknown template set {name_or_path!r}; choose one of: {', '.join(list_templates())}, or a JSON file"
    )


def fill(template: str, label: str) -> str:
    # str.replace, not str.format: labels may contain braces
    return template.replace(PLACEHOLDER, label)
