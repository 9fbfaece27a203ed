"""The feature cache: each image is encoded once per model, keyed by its bytes, not its path."""

from __future__ import annotations

import logging
import re
import shutil

import torch
from PIL import Image

from fsclip.adapters import fit
from fsclip.adapters._features import encode_items
from fsclip.data import load_image_folder
from fsclip.shapes import write_folder

LOGGER = "fsclip.adapters._features"


def _encoded(caplog) -> int:
    """Images the cache had to encode, summed over the log lines since the last clear."""
    counts = [re.search(r"(\d+) encoded", r.getMessage()) for r in caplog.records if r.name == LOGGER]
    return sum(int(m.group(1)) for m in counts if m)


def test_refitting_with_other_hyper_parameters_encodes_nothing(small_task, tiny_openclip, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    fit(tiny_openclip, small_task.pool, "linear-probe", val=small_task.val, templates="generic")
    caplog.clear()
    fit(tiny_openclip, small_task.pool, "linear-probe", val=small_task.val, templates="generic", c_grid=(0.5, 5.0))
    fit(tiny_openclip, small_task.pool, "tip-adapter", val=small_task.val, templates="generic")
    assert _encoded(caplog) == 0


def test_cache_is_keyed_by_content_and_matches_fresh_encoding(small_task, tiny_openclip, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    paths = list(small_task.test.paths)
    first = encode_items(tiny_openclip, paths)
    copies = []
    for i, p in enumerate(paths):  # same bytes under new names: hits
        copies.append(tmp_path / f"renamed-{i}.png")
        shutil.copy(p, copies[-1])
    caplog.clear()
    again = encode_items(tiny_openclip, copies)
    assert _encoded(caplog) == 0
    assert torch.equal(first, again)
    fresh = encode_items(tiny_openclip, paths, cache=False)
    torch.testing.assert_close(first, fresh)


def test_an_edited_file_is_encoded_again(small_task, tiny_openclip, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    dst = tmp_path / "img.png"
    shutil.copy(small_task.test.paths[0], dst)
    encode_items(tiny_openclip, [dst])
    img = Image.open(dst).convert("RGB")
    img.paste((255, 0, 0), (0, 0, 24, 24))  # same path, new content
    img.save(dst)
    caplog.clear()
    feats = encode_items(tiny_openclip, [dst])
    assert _encoded(caplog) == 1
    torch.testing.assert_close(feats, encode_items(tiny_openclip, [dst], cache=False))


def test_other_model_other_cache(tiny_openclip, tiny_hf_clip, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    paths = [p for p, _ in write_folder(tmp_path, {"star": [("red", "star")]}, 3, seed=99, size=40)]
    encode_items(tiny_openclip, paths)
    caplog.clear()
    encode_items(tiny_openclip, paths)
    encode_items(tiny_hf_clip, paths)
    assert _encoded(caplog) == len(paths)


def test_augmented_views_are_cached_too(small_task, tiny_openclip, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    data = load_image_folder(small_task.root / "train")
    fit(tiny_openclip, data, "tip-adapter-f", val=small_task.val, templates="generic", epochs=1, views=2)
    caplog.clear()
    fit(tiny_openclip, data, "tip-adapter-f", val=small_task.val, templates="generic", epochs=3, views=2, lr=1e-2)
    assert _encoded(caplog) == 0
    assert any(f"2 augmented view(s) of {len(data)} image(s) (all cached)" in r.getMessage() for r in caplog.records)
