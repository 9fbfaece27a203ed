"""What the web service serves when the files or the index change under it."""

from __future__ import annotations

import io
import os
import shutil

import pytest
from _search_util import photos, tiny_backend  # noqa: F401
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from fsclip.search import ImageIndex  # noqa: E402
from fsclip.search.service import build_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SECRET = b"root:$6$salted-hash-of-the-password:19000:0:99999:7:::\n"


@pytest.fixture
def served(tmp_path, tiny_backend):  # noqa: F811
    paths = photos(tmp_path / "photos", 6)
    (tmp_path / "shadow").write_bytes(SECRET)
    index = ImageIndex.create(tmp_path / "p.idx", tiny_backend)
    index.add([tmp_path / "photos"])
    return TestClient(build_app(index), base_url="http://127.0.0.1:8000"), index, paths, tmp_path


def _get(client, route: str, path) -> object:
    return client.get(route, params={"path": str(path)})


@pytest.mark.parametrize("route", ["/api/image", "/api/thumb"])
def test_serve_after_an_indexed_image_was_swapped_for_a_symlink_to_a_secret(served, route):
    client, _, paths, root = served
    paths[0].unlink()
    paths[0].symlink_to(root / "shadow")
    resp = _get(client, route, paths[0])
    assert resp.status_code == 404 and SECRET not in resp.content, resp.text
    assert "not served" in resp.json()["error"]
    assert _get(client, route, paths[1]).status_code == 200  # the others are still served


@pytest.mark.parametrize("route", ["/api/image", "/api/thumb"])
def test_serve_after_an_indexed_image_was_replaced_by_a_hard_link_to_a_secret(served, route):
    client, _, paths, root = served
    paths[0].unlink()
    os.link(root / "shadow", paths[0])
    resp = _get(client, route, paths[0])
    assert resp.status_code == 404 and SECRET not in resp.content, resp.text


def test_serve_after_an_indexed_image_was_replaced_by_another_picture(served):
    """Same name, other content (not re-indexed yet): its vector describes the old picture, so it is not served."""
    client, index, paths, _ = served
    Image.new("RGB", (32, 32), "white").save(paths[2])
    resp = _get(client, "/api/image", paths[2])
    assert resp.status_code == 404 and "changed since it was indexed" in resp.json()["error"]
    index.update()
    resp = _get(client, "/api/image", paths[2])
    assert resp.status_code == 200 and resp.content == paths[2].read_bytes()


def test_serve_an_indexed_symlink_that_leads_outside_the_indexed_folders(tmp_path, tiny_backend):  # noqa: F811
    """Searchable, but the file itself is not served: only what lies under the indexed folders is."""
    (outside,) = photos(tmp_path / "elsewhere", 1, seed=3)
    photos(tmp_path / "photos", 2)
    (tmp_path / "photos" / "link.png").symlink_to(outside)
    index = ImageIndex.create(tmp_path / "p.idx", tiny_backend)
    index.add([tmp_path / "photos"])
    client = TestClient(build_app(index), base_url="http://127.0.0.1")
    link = tmp_path / "photos" / "link.png"
    assert index.lookup(str(link)) is not None
    resp = _get(client, "/api/image", link)
    assert resp.status_code == 404 and "outside the indexed folders" in resp.json()["error"]
    assert _get(client, "/api/image", tmp_path / "photos" / "img0000.png").status_code == 200


def test_serve_while_the_index_is_rebuilt_with_overwrite(tmp_path, tiny_backend):  # noqa: F811
    """The running server switches to the new index; files only the old one held are no longer served."""
    old = photos(tmp_path / "old", 4)
    new = photos(tmp_path / "new", 3, seed=5)
    index = ImageIndex.create(tmp_path / "p.idx", tiny_backend)
    index.add([tmp_path / "old"])
    client = TestClient(build_app(index), base_url="http://127.0.0.1")
    assert client.get("/api/info").json()["images"] == 4
    with ImageIndex.create(tmp_path / "p.idx", tiny_backend, overwrite=True) as rebuilt:  # `index build --overwrite`
        rebuilt.add([tmp_path / "new"])
    assert client.get("/api/info").json()["images"] == 3
    body = client.get("/api/search", params={"q": "a red circle", "k": 10}).json()
    assert {r["path"] for r in body["results"]} == {str(p) for p in new}
    assert _get(client, "/api/image", old[0]).status_code == 404
    assert client.get("/api/search", params={"like": str(old[0])}).status_code == 404
    resp = _get(client, "/api/thumb", new[0])
    assert resp.status_code == 200 and Image.open(io.BytesIO(resp.content)).size == (32, 32)


def test_serve_while_the_index_is_replaced_by_one_for_another_model(tmp_path, tiny_backend, tiny_hf_clip_dir):  # noqa: F811
    from fsclip.backends import load_model

    old = photos(tmp_path / "old", 3)
    index = ImageIndex.create(tmp_path / "p.idx", tiny_backend)
    index.add([tmp_path / "old"])
    client = TestClient(build_app(index), base_url="http://127.0.0.1")
    other = load_model(str(tiny_hf_clip_dir), device="cpu")
    shutil.rmtree(tmp_path / "p.idx")
    with ImageIndex.create(tmp_path / "p.idx", other) as rebuilt:
        rebuilt.add([tmp_path / "old"])
    for resp in (client.get("/api/search", params={"q": "x"}), _get(client, "/api/image", old[0]),
                 client.get("/api/info")):
        assert resp.status_code == 503 and "restart it to use the new index" in resp.json()["error"]


def test_serve_a_collection_with_a_latin1_file_name(tmp_path, tiny_backend):  # noqa: F811
    """The JSON shows the name escaped (valid UTF-8) and its thumb/image/like links lead back to the file."""
    (src,) = photos(tmp_path / "photos", 1)
    odd = os.path.join(os.fsencode(tmp_path / "photos"), b"caf\xe9.png")
    os.rename(src, odd)
    index = ImageIndex.create(tmp_path / "p.idx", tiny_backend)
    index.add([tmp_path / "photos"])
    client = TestClient(build_app(index), base_url="http://127.0.0.1")
    resp = client.get("/api/search", params={"q": "x"})
    resp.content.decode("utf-8")  # strict
    (hit,) = resp.json()["results"]
    assert hit["path"] == f"{tmp_path}/photos/caf\\xe9.png"
    image = client.get(hit["image"])
    assert image.status_code == 200 and image.content == open(odd, "rb").read()
    assert client.get(hit["thumb"]).status_code == 200
    like = client.get("/api/search", params={"like": hit["path"]}).json()
    assert like["results"][0]["path"] == hit["path"] and like["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
