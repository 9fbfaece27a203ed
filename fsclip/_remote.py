"""Files named by URI (`s3://`, `gs://`, `https://`, `file://`, ...) read through fsspec.

Local paths never come here. A URI whose filesystem package is missing, or whose scheme fsspec does not
know, is a `DataError` with one line naming what to install.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from fsclip.errors import DataError

__all__ = ["filesystem", "is_uri", "read"]

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
INSTALL = "pip install 'fsclip[remote]'"


def is_uri(path: object) -> bool:
    """True for `scheme://...` strings; Windows drive paths and plain paths are not URIs."""
    return isinstance(path, str) and _URI.match(path) is not None


def filesystem(uri: str) -> tuple[Any, str]:
    """`(fsspec filesystem, path within it)` for `uri`, or a `DataError` saying what is missing."""
    protocol = uri.split("://", 1)[0].lower()
    try:
        import fsspec
        from fsspec.registry import known_implementations
    except ImportError:
        raise DataError(f"reading {protocol}:// URIs needs fsspec: {INSTALL}") from None
    if protocol not in known_implementations and protocol not in fsspec.available_protocols():
        raise DataError(f"unknown URI scheme {protocol!r} in {uri}; fsspec knows e.g. s3, gs, https, file")
    try:
        return fsspec.core.url_to_fs(uri)
    except ImportError as e:
        hint = known_implementations.get(protocol, {}).get("err") or str(e)
        raise DataError(f"reading {protocol}:// URIs: {hint.rstrip('.')} ({INSTALL})") from None


def read(uri: str) -> tuple[bytes, int | None]:
    """The bytes of the file at `uri` and its modification time in ns (None where the store has none).

    Raises OSError (FileNotFoundError for a missing object) as a local read would.
    """
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        data = f.read()
        details = getattr(f, "details", None)  # remote files fetch their metadata on open
    if details is None:
        details = fs.info(path)
    return data, _mtime_ns(details)


def _mtime_ns(info: dict) -> int | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime):
            return int(value.timestamp() * 1e9)
        if isinstance(value, (int, float)):
            return int(value * 1e9)
    return None
