"""Image discovery and decoding that survives real photo folders.

Every failure becomes an `ImageLoadError` with a one-line reason; batch loaders report it per item and
carry on. Decoding runs in worker threads (PIL releases the GIL while decoding) so it overlaps compute.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fsclip._remote import is_uri
from fsclip._remote import read as read_uri
from fsclip.errors import DataError

__all__ = [
    "AVIF_EXTENSIONS",
    "HEIF_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "Batch",
    "ImageLoadError",
    "decoder_hint",
    "find_images",
    "iter_inputs",
    "iter_batches",
    "load_image",
    "register_decoders",
    "to_rgb",
]

logger = logging.getLogger(__name__)

# HEIF/AVIF (phone cameras) are listed whether or not a decoder is installed: without one each file
# is reported with what to install (`decoder_hint`), never skipped without a word.
HEIF_EXTENSIONS = frozenset({".heic", ".heics", ".heif", ".heifs", ".hif"})
AVIF_EXTENSIONS = frozenset({".avif", ".avifs"})
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
     ".pbm"}
) | HEIF_EXTENSIONS | AVIF_EXTENSIONS
# PIL raises DecompressionBombError above twice its MAX_IMAGE_PIXELS; we refuse at the same size,
# before decoding, with a reason the user can act on.
DEFAULT_MAX_PIXELS = 2 * 89_478_485


class ImageLoadError(DataError):
    """One image that could not be used; the message is the reason."""


@functools.cache
def register_decoders() -> None:
    """Register optional PIL decoders once, on first use (never at import): HEIF via pillow-heif.

    AVIF is Pillow's own (Pillow >= 11.3 wheels include it).
    """
    try:
        import pillow_heif
    except ImportError:
        return
    pillow_heif.register_heif_opener()


def decoder_hint(path) -> str | None:
    """Why a file of a known image type could not be identified when its decoder is missing, else None."""
    register_decoders()
    name = getattr(path, "name", path)  # a path, or an open file that may know its name
    if not isinstance(name, str | os.PathLike):
        return None
    suffix = os.path.splitext(os.fspath(name))[1].lower()
    if suffix in HEIF_EXTENSIONS and "HEIF" not in Image.OPEN:
        return "HEIF image, but no HEIF decoder is installed: pip install 'fsclip[heif]' (pillow-heif)"
    if suffix in AVIF_EXTENSIONS and "AVIF" not in Image.OPEN:
        return "AVIF image, but this Pillow cannot decode AVIF: pip install -U 'pillow>=11.3'"
    return None


def find_images(paths: Iterable[str | os.PathLike], recursive: bool = True) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files of `iter_inputs(paths)`, and `(path, reason)` for the inputs that cannot be read."""
    found: list[Path] = []
    missing: list[tuple[Path, str]] = []
    for path, reason in iter_inputs(paths, recursive):
        if reason is None:
            found.append(path)
        else:
            missing.append((path, reason))
    return found, missing


def iter_inputs(paths: Iterable[str | os.PathLike], recursive: bool = True) -> Iterator[tuple[Path, str | None]]:
    """Expand files and folders, in input order, into `(image path, None)` or `(path, reason)`.

    A folder gives its image files sorted by path (hidden entries skipped, symlinked folders not
    followed), with a folder it cannot read reported in its place. A file named explicitly is kept
    whatever its extension (it may still fail to decode, and is then reported); a name that is
    missing or not a regular file (a FIFO, a device) comes back with the reason.
    """
    for raw in paths:
        p = Path(raw)
        try:
            mode = p.stat().st_mode
        except FileNotFoundError:
            yield p, "no such file or folder"
            continue
        except OSError as e:
            yield p, f"cannot read: {(e.strerror or type(e).__name__).lower()}"
            continue
        if stat.S_ISDIR(mode):
            yield from _walk(p, recursive)
        elif stat.S_ISREG(mode):
            yield p, None
        else:
            yield p, f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'special file')})"


_KINDS = {stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device"}


def _walk(root: Path, recursive: bool) -> list[tuple[Path, str | None]]:
    # iterative: folder depth is the user's, not bounded by Python's recursion limit
    found: list[tuple[Path, str | None]] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            found.append((folder, f"cannot read folder: {(e.strerror or type(e).__name__).lower()}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        stack.append(Path(entry.path))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                    found.append((Path(entry.path), None))
            except OSError:  # vanished while listing
                continue
    found.sort(key=lambda item: item[0])
    return found


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited on white, 16-bit and float scaled to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        if mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        elif mode.startswith("I;16") or arr.max() > 255:
            arr = arr / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike | BinaryIO, draft_size: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, EXIF-rotate and convert one image to RGB, or raise `ImageLoadError` with the reason.

    `path` is a local path, a URI read through fsspec (`s3://...`, see `fsclip._remote`), or a binary
    file object (bytes already fetched). `draft_size` lets the JPEG decoder shrink by 1/2..1/8 while
    keeping both sides >= that size, which makes large photos several times cheaper to decode before
    the resize to model resolution.
    """
    register_decoders()
    try:
        source = _source(path)
        with Image.open(source) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageLoadError(f"image too large: {w}x{h} pixels is over the {max_pixels}-pixel limit")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError("no such file") from None
    except UnidentifiedImageError:
        raise ImageLoadError(decoder_hint(path) or "not an image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated data, bad headers, codec errors
        raise ImageLoadError(f"cannot decode: {e}") from None


def _source(path: str | os.PathLike | BinaryIO) -> Path | BinaryIO:
    """What `Image.open` should read; an empty or unreadable file raises `ImageLoadError` here."""
    if hasattr(path, "read"):
        return path
    if is_uri(path):
        try:
            data, _ = read_uri(path)
        except FileNotFoundError:
            raise ImageLoadError("no such file") from None
        except OSError as e:
            raise ImageLoadError(f"cannot read: {e}") from None
        if not data:
            raise ImageLoadError("empty file")
        return io.BytesIO(data)
    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageLoadError("empty file")
    return path


@dataclass
class Batch:
    """Positions (into the input sequence) of the images that loaded, their pixels, and the failures."""

    indices: list[int]
    pixels: torch.Tensor | None
    errors: list[tuple[int, str]] = field(default_factory=list)


def _load_one(item, transform: Callable, draft_size: int | None) -> torch.Tensor:
    img = item if isinstance(item, Image.Image) else load_image(item, draft_size=draft_size)
    return transform(to_rgb(img))


def iter_batches(
    items: Sequence[str | os.PathLike | Image.Image],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 32,
    num_workers: int | None = None,
    draft_size: int | None = None,
    warn: bool = True,
) -> Iterator[Batch]:
    """Decode and transform `items` in background threads, yielding batches in input order.

    Loading runs up to two batches ahead of the consumer, so model compute and decoding overlap. An
    unreadable item is logged as skipped (unless not `warn`: the caller reports or refuses it) and
    comes back in the batch's `errors`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    workers = num_workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsclip-load") as pool:
        pending: deque[tuple[int, Future]] = deque()
        it = iter(enumerate(items))
        ahead = 2 * batch_size

        def fill() -> None:
            while len(pending) < ahead:
                try:
                    i, item = next(it)
                except StopIteration:
                    return
                pending.append((i, pool.submit(_load_one, item, transform, draft_size)))

        fill()
        while pending:
            indices, tensors, errors = [], [], []
            while pending and len(indices) + len(errors) < batch_size:
                i, fut = pending.popleft()
                try:
                    tensors.append(fut.result())
                    indices.append(i)
                except ImageLoadError as e:
                    errors.append((i, str(e)))
                    if warn:
                        logger.warning("skipping %s: %s", items[i], e)
                fill()
            yield Batch(indices, torch.stack(tensors) if tensors else None, errors)
