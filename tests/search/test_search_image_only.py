"""An index built with an image-only model (timm): image-to-image search works, text queries are refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from searchutil import render_photos

from fsclip.cli import main
from fsclip.errors import UsageError
from fsclip.search import AnnConfig, ImageIndex
from fsclip.shapes.world import BASE_SHAPES, COLOURS, render

BACKBONE = Path(__file__).resolve().parents[2] / "fsclip" / "assets" / "shapes-resnet" / "model.safetensors"
needs_backbone = pytest.mark.skipif(not BACKBONE.is_file(), reason="bundled backbone not trained yet")


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory, tiny_timm_dir):
    root = tmp_path_factory.mktemp("image-only")
    photos = render_photos(root / "photos", 24, seed=3)
    assert main(["index", "build", str(root / "photos"), "--index", str(root / "t.idx"), "--model",
                 str(tiny_timm_dir), "-q"]) == 0
    return root / "t.idx", photos


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("fsclip: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_text_queries_are_refused_in_one_line(tiny_index, capsys):
    path, photos = tiny_index
    capsys.readouterr()
    for argv in (["a red circle"], ["--image", str(photos[0]), "--minus", "blue"]):
        code = main(["search", str(path), *argv])
        out, err = capsys.readouterr()
        assert code == 2 and out == ""
        line = _one_error_line(err)
        assert "has no text tower" in line and "image queries only (--image PATH)" in line
    with ImageIndex.open(path) as index:
        assert not index.has_text and not index.info()["has_text"]
        with pytest.raises(UsageError, match="has no text tower"):
            index.search(text="a red circle")
        # image queries: an indexed image is its own best match
        hits = index.search(image=photos[3], k=3)
        assert hits[0].path == str(photos[3]) and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_service_refuses_text_with_the_same_message(tiny_index):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from fsclip.search.service import build_app

    path, photos = tiny_index
    with ImageIndex.open(path) as index:
        client = TestClient(build_app(index), base_url="http://127.0.0.1:8000")
        info = client.get("/api/info").json()
        assert info["has_text"] is False and info["images"] == 24
        resp = client.get("/api/search", params={"q": "a red circle"})
        assert resp.status_code == 400
        with pytest.raises(UsageError) as e:
            index.search(text="a red circle")
        assert resp.json()["error"] == str(e.value)
        resp = client.get("/api/search", params={"like": str(photos[2]), "k": 2})
        assert resp.status_code == 200 and resp.json()["results"][0]["path"] == str(photos[2])


def test_an_image_only_index_goes_ivf_tuned_on_image_queries(tmp_path, tiny_timm_dir, one_torch_thread):
    """Above the threshold the IVF index is tuned on image queries alone; no text tower is asked for."""
    render_photos(tmp_path / "photos", 320, seed=8, size=24)
    index = ImageIndex.create(tmp_path / "ivf.idx", str(tiny_timm_dir), ann=AnnConfig(ann_threshold=300),
                              device="cpu")
    with index:
        index.add([tmp_path / "photos"])
        info = index.info()
    assert info["index"]["kind"] == "ivf" and info["index"]["tuned_recall_at_10"] >= 0.97


@needs_backbone
def test_image_search_on_the_bundled_backbone_finds_the_same_colour_and_shape(tmp_path, one_torch_thread):
    """Each colour x base shape drawn 5 times; an indexed image's 4 nearest others are its 4 siblings.

    Measured on collections drawn with seeds 0, 1, 2: same colour and shape in the top 4 (query
    excluded) 1.000 each; same shape alone in the top 5, 0.975-0.98. Chance: 4/239 and 1/6.
    """
    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    photos.mkdir()
    for c in COLOURS:
        for s in BASE_SHAPES:
            for i in range(5):
                render(c, s, rng, 96).save(photos / f"{c}_{s}_{i}.png")
    assert main(["index", "build", str(photos), "--index", str(tmp_path / "s.idx"), "--model", "shapes-resnet",
                 "-q"]) == 0
    with ImageIndex.open(tmp_path / "s.idx") as index:
        assert index.info()["backend"] == "timm" and not index.has_text
        same = []
        for q in sorted(photos.iterdir())[::3]:
            hits = [h for h in index.search(image=q, k=5) if h.path != str(q)][:4]
            same += [Path(h.path).stem.rsplit("_", 1)[0] == q.stem.rsplit("_", 1)[0] for h in hits]
    assert np.mean(same) >= 0.9, np.mean(same)
