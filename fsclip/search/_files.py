"""Reading files for the web service: only the file that was indexed, and bounded image decoding.

Between indexing and a request, anyone who can write to the photo folders can swap an indexed
`x.png` for a symlink to `/etc/shadow`, a hard link, a FIFO, or a folder symlink. So a path is served
only when (1) its real path lies under the real path of an indexed root, (2) the final component
opens without following a link (`O_NOFOLLOW`) and without blocking (`O_NONBLOCK`: a FIFO never
stalls a worker), and (3) `fstat` of the open descriptor shows the regular file that was embedded:
same device, inode, size and mtime. Everything after that reads the descriptor, never the path again.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from fsclip.images import ImageLoadError, register_decoders, to_rgb
from fsclip.search._scan import under
from fsclip.search.index import FileIdentity

__all__ = ["NotServable", "decode", "iter_chunks", "open_indexed", "parse_display_path"]

_CHUNK = 256 * 1024
_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def parse_display_path(text: str) -> str | None:
    """The file name that `fsclip._paths.display_path` showed as `text` (its `\\xNN` escapes turned back
    into bytes), or None when `text` has no such escape.

    The service's JSON shows names that are not UTF-8 escaped; a request that sends one back is
    looked up as given first, then as this (a name really containing `\\xNN` displays the same way).
    """
    raw = text.encode("utf-8", "surrogateescape")
    if not _ESCAPE.search(raw):
        return None
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m[1], 16)]), raw))


class NotServable(Exception):
    """The file at an indexed path is not the one that was indexed (or is gone); the message says why."""


def open_indexed(path: str, identity: FileIdentity, roots: Sequence[str]) -> BinaryIO:
    """Open `path` for reading if it is still exactly the file that was indexed; else `NotServable`."""
    real = os.path.realpath(path)
    if not any(under(real, os.path.realpath(root)) for root in roots):
        raise NotServable("it leads outside the indexed folders")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise NotServable("the file no longer exists") from None
    except OSError as e:  # ELOOP: the final component became a symlink
        raise NotServable(f"cannot open it ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        seen = FileIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        recorded = identity if identity.ino is not None else identity._replace(dev=st.st_dev, ino=st.st_ino)
        if not stat.S_ISREG(st.st_mode) or seen != recorded:
            raise NotServable("the file changed since it was indexed; run `fsclip index update`")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def iter_chunks(f: BinaryIO) -> Iterator[bytes]:
    """The file's bytes in chunks; closes it at the end (or when the client goes away)."""
    with contextlib.closing(f):
        while data := f.read(_CHUNK):
            yield data


def decode(f: BinaryIO | bytes, *, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode an open image file (or bytes) to RGB, refusing more than `max_pixels` decoded pixels.

    The limit is checked on the header, after a JPEG's draft mode has picked its reduced decoding
    size, so a small file declaring a huge canvas (a pixel bomb) costs nothing. Raises `ImageLoadError`
    with the same reasons as `fsclip.images.load_image`.
    """
    if isinstance(f, bytes):
        f = io.BytesIO(f)
    register_decoders()
    try:
        with Image.open(f) as img:
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageLoadError(f"image too large: {w}x{h} pixels is over the {max_pixels}-pixel limit")
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError("not an image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(f"cannot decode: {e}") from None
