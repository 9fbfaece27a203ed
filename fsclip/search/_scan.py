"""Streaming folder walk and per-file probing (content hash, pixel size) for index updates."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

from PIL import Image

from fsclip.images import IMAGE_EXTENSIONS

_BLOCK = 1 << 20
_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def normpath(path: str | os.PathLike) -> str:
    """The one spelling of a path the index stores: absolute, user-expanded, not symlink-resolved."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def walk(root: str, excludes: frozenset[str] = frozenset()) -> Iterator[tuple[str, int, int]]:
    """Yield `(path, size, mtime_ns)` for image files under `root` (or `root` itself if a file).

    Same selection as `fsclip.images.find_images` (image extensions, hidden entries skipped, a file
    named explicitly kept whatever its extension), but streamed, in sorted order, one folder at a time.
    """
    if os.path.isfile(root):
        if root not in excludes:
            st = os.stat(root)
            yield root, st.st_size, st.st_mtime_ns
        return
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.join(folder, d) not in excludes)
        for name in sorted(files):
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(folder, name)
            if path in excludes:
                continue
            try:
                st = os.stat(path)
            except OSError:  # vanished or dangling symlink: not a file the index can hold
                continue
            if os.path.isfile(path):
                yield path, st.st_size, st.st_mtime_ns


def probe(path: str) -> tuple[str, int | None, int | None]:
    """`(content hash, width, height)`; the size as displayed (EXIF rotation applied), None if unreadable.

    Raises OSError when the file cannot be read at all.
    """
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    try:
        with Image.open(path) as img:  # reads the header only
            w, h_px = img.size
            if img.getexif().get(_ORIENTATION) in _SWAPS_SIDES:
                w, h_px = h_px, w
    except Exception:  # noqa: BLE001 - any decoder failure: the encoder reports the real reason
        w = h_px = None
    return h.hexdigest(), w, h_px
