"""Streaming folder walk and per-file probing (content hash, pixel size) for index updates."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError

from fsclip._paths import display_path
from fsclip.errors import DataError
from fsclip.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageLoadError,
    decoder_hint,
    register_decoders,
)

_BLOCK = 1 << 20
_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def normpath(path: str | os.PathLike) -> str:
    """The one spelling of a path the index stores: absolute, user-expanded, not symlink-resolved."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class Entry(NamedTuple):
    """A file found by `walk`, with the identity the index records (and checks before serving it)."""

    path: str
    size: int
    mtime_ns: int
    dev: int
    ino: int


def _entry(path: str, st: os.stat_result) -> Entry:
    return Entry(path, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)


def walk(root: str, excludes: frozenset[str] = frozenset(),
         unreadable: list[tuple[str, str]] | None = None) -> Iterator[Entry]:
    """Yield an `Entry` for each image file under `root` (or `root` itself if a file).

    Same selection as `fsclip.images.find_images` (image extensions, hidden entries skipped, a file
    named explicitly kept whatever its extension), but streamed, in sorted order, one folder at a time.
    Folders that cannot be listed are appended to `unreadable` as `(folder, reason)`.
    """
    if os.path.isfile(root):
        if root not in excludes:
            yield _entry(root, os.stat(root))
        return

    def onerror(e: OSError) -> None:
        if unreadable is not None:
            unreadable.append((e.filename, e.strerror or str(e)))

    for folder, dirs, files in os.walk(root, onerror=onerror):
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
            if stat.S_ISREG(st.st_mode):
                yield _entry(path, st)


def check_root(path: str) -> None:
    """Refuse a root that is missing or is neither a regular file nor a folder (a FIFO, a device)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"no such file or folder: {display_path(path)}") from None
    except OSError as e:
        raise DataError(f"cannot use {display_path(path)}: {e.strerror or e}") from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise DataError(f"{display_path(path)} is {kind}, not an image file or a folder")


def probe(path: str) -> tuple[str, int | None, int | None]:
    """`(content hash, width, height)`; the size as displayed (EXIF rotation applied).

    The header is read first, so a file that is not an image, or one too large to decode, is
    refused (`ImageLoadError`) before a byte of it is hashed: a 20 GB `big.jpg` full of zeros costs
    one read of its first bytes. Errors the header cannot show (truncated data) come from the
    encoder later. Raises OSError when the file cannot be read at all.
    """
    register_decoders()
    if os.stat(path).st_size == 0:
        raise ImageLoadError("empty file")
    try:
        with Image.open(path) as img:  # reads the header only
            w, h_px = img.size
            if img.getexif().get(_ORIENTATION) in _SWAPS_SIDES:
                w, h_px = h_px, w
    except UnidentifiedImageError:
        raise ImageLoadError(decoder_hint(path) or "not an image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"image too large: {e}") from None
    except (SyntaxError, ValueError, EOFError, OSError) as e:
        if type(e) in (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        w = h_px = None  # a damaged header: the encoder reports the precise reason
    if w is not None and w * h_px > DEFAULT_MAX_PIXELS:
        raise ImageLoadError(f"image too large: {w}x{h_px} pixels is over the {DEFAULT_MAX_PIXELS}-pixel limit")
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest(), w, h_px
