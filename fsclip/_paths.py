"""How paths are shown to people and written to text output."""

from __future__ import annotations

import os

__all__ = ["display_path"]


def display_path(path: str | os.PathLike) -> str:
    """`path` as valid Unicode: bytes of a name that is not valid UTF-8 (held by Python as surrogate
    escapes) are written `\\xNN`, so JSON, CSV and terminals get valid UTF-8 and the bytes stay visible."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
