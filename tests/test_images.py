import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fsclip.images import ImageLoadError, find_images, iter_batches, load_image, to_rgb


def _png_claiming(path, width, height):
    """A tiny PNG whose header claims width x height: a decompression bomb for any naive reader."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.fixture
def messy(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(good)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image at all")
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    _png_claiming(tmp_path / "bomb.png", 50_000, 50_000)
    (tmp_path / "sub").mkdir()
    Image.new("L", (20, 20), 128).save(tmp_path / "sub" / "gray.png")
    (tmp_path / "sub" / "readme.txt").write_text("skipped by extension")
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".hidden" / "x.png")
    return tmp_path


def test_find_images_walks_recursively_and_reports_missing(messy):
    found, missing = find_images([messy, messy / "nope.jpg"])
    names = sorted(p.name for p in found)
    assert names == ["bomb.png", "empty.png", "good.jpg", "gray.png", "notes.jpg", "truncated.jpg"]
    assert [(p.name, why) for p, why in missing] == [("nope.jpg", "no such file or folder")]


@pytest.mark.parametrize(
    ("name", "reason"),
    [("empty.png", "empty file"), ("notes.jpg", "not an image"), ("truncated.jpg", "cannot decode"),
     ("bomb.png", "too large"), ("missing.png", "no such file")],
)
def test_bad_files_raise_one_line_reasons(messy, name, reason):
    with pytest.raises(ImageLoadError, match=reason) as e:
        load_image(messy / name)
    assert "\n" not in str(e.value)


def test_batches_skip_bad_files_and_keep_order(messy):
    items, _ = find_images([messy])
    batches = list(iter_batches(items, lambda im: torch.tensor(im.size), batch_size=4))
    ok = [i for b in batches for i in b.indices]
    bad = {items[i].name for b in batches for i, _ in b.errors}
    assert [items[i].name for i in ok] == ["good.jpg", "gray.png"]
    assert bad == {"bomb.png", "empty.png", "notes.jpg", "truncated.jpg"}
    assert all(b.pixels is None or len(b.pixels) == len(b.indices) for b in batches)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 30), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rot.jpg").size == (30, 60)


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "LA", "I;16", "I", "F", "1"])
def test_modes_become_rgb(mode):
    img = Image.new("RGB", (10, 10), (255, 0, 0)).convert(mode) if mode not in ("I;16", "I", "F") else None
    if img is None:
        arr = np.full((10, 10), 65535 if mode != "F" else 3.5, dtype={"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
        img = Image.fromarray(arr)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (10, 10)


def test_sixteen_bit_white_stays_white_and_alpha_goes_on_white():
    white16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(white16).getpixel((0, 0)) == (255, 255, 255)
    mid16 = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))
    assert to_rgb(mid16).getpixel((0, 0)) == (128, 128, 128)
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)


def test_jpeg_draft_shrinks_large_photos_but_not_below_request(tmp_path):
    Image.new("RGB", (3000, 2000), (10, 200, 10)).save(tmp_path / "big.jpg", quality=90)
    img = load_image(tmp_path / "big.jpg", draft_size=224)
    assert min(img.size) >= 224 and img.size[0] <= 750
    assert load_image(tmp_path / "big.jpg").size == (3000, 2000)
