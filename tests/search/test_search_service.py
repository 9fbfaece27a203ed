"""HTTP API: searches, thumbnails, uploads, and what must never be served."""

from __future__ import annotations

import io
from urllib.parse import quote

import pytest
from PIL import Image
from searchutil import render_photos

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from fsclip.search import ImageIndex  # noqa: E402
from fsclip.search.service import build_app  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_backend):
    root = tmp_path_factory.mktemp("svc")
    photos = render_photos(root / "photos", 20, seed=21)
    (root / "secret.txt").write_text("top secret")
    Image.new("RGB", (8, 8)).save(root / "not-indexed.png")
    index = ImageIndex.create(root / "s.idx", tiny_backend)
    index.add([root / "photos"])
    client = TestClient(build_app(index, max_upload_bytes=50_000), base_url="http://127.0.0.1:8000")
    return client, index, photos, root


def _ok(resp) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()


def _error(resp, status: int, fragment: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert fragment in resp.json()["error"]


def test_text_search_equals_library_search(served):
    client, index, _, _ = served
    body = _ok(client.get("/api/search", params={"q": "a red circle", "k": 5}))
    expected = index.search(text="a red circle", k=5)
    assert [r["path"] for r in body["results"]] == [h.path for h in expected]
    assert body["results"][0]["score"] == pytest.approx(expected[0].score, abs=1e-6)
    assert body["results"][0]["thumb"] == f"/api/thumb?path={quote(expected[0].path, safe='')}"


def test_multiple_queries_minus_and_filters(served):
    client, index, photos, _ = served
    params = [("q", "a dog"), ("q", "a beach"), ("minus", "people"), ("k", "20"), ("glob", "*img002?.png")]
    body = _ok(client.get("/api/search", params=params))
    expected = index.search(text=["a dog", "a beach"], negative_text=["people"], k=20,
                            where={"path_glob": "*img002?.png"})
    assert [r["path"] for r in body["results"]] == [h.path for h in expected]
    assert all(r["path"].rsplit("/", 1)[1].startswith("img002") for r in body["results"])


def test_search_by_indexed_path_finds_itself_first(served):
    client, _, photos, _ = served
    body = _ok(client.get("/api/search", params={"like": str(photos[3]), "k": 3}))
    assert body["results"][0]["path"] == str(photos[3])
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_search_by_uploaded_image(served):
    client, _, photos, _ = served
    data = photos[7].read_bytes()
    body = _ok(client.post("/api/search/image?k=2", content=data, headers={"content-type": "image/png"}))
    assert body["results"][0]["path"] == str(photos[7])  # the same picture, re-encoded, ranks first


def test_thumbnails_and_images_of_indexed_files(served):
    client, _, photos, _ = served
    resp = client.get("/api/thumb", params={"path": str(photos[0])})
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(resp.content)).size == (32, 32)  # never enlarged
    resp = client.get("/api/image", params={"path": str(photos[0])})
    assert resp.status_code == 200 and resp.content == photos[0].read_bytes()
    assert "sandbox" in resp.headers["content-security-policy"]


@pytest.mark.parametrize("route", ["/api/thumb", "/api/image"])
def test_never_serves_files_outside_the_index(served, route):
    client, _, photos, root = served
    folder = photos[0].parent
    attempts = [
        str(root / "secret.txt"),  # absolute path outside the collection
        "/etc/passwd",
        f"{folder}/../secret.txt",  # ../ out of an indexed folder
        f"{folder}/../../../../../../etc/passwd",
        "../secret.txt",
        str(root / "not-indexed.png"),  # an image, but not indexed
        str(photos[0]).replace("/photos/", "/photos/./"),  # an indexed file, spelled differently
        "",
    ]
    for path in attempts:
        resp = client.get(route, params={"path": path})
        _error(resp, 404, "not in the index")
        assert b"top secret" not in resp.content and b"root:" not in resp.content
    # the same traversal through the URL path itself is no route at all
    resp = client.get("/api/image/../../etc/passwd")
    assert resp.status_code == 404 and b"root:" not in resp.content
    resp = client.get("/static/../../../../etc/passwd")
    assert resp.status_code == 404 and b"root:" not in resp.content


def test_search_by_path_outside_the_index_is_refused(served):
    client, _, _, root = served
    _error(client.get("/api/search", params={"like": str(root / "not-indexed.png")}), 404, "not in the index")


def test_upload_limits_and_bad_uploads(served):
    client, _, _, _ = served
    big = b"\x89PNG" + b"0" * 200_000
    _error(client.post("/api/search/image", content=big, headers={"content-type": "image/png"}), 413, "too large")
    _error(client.post("/api/search/image", content=b"not an image", headers={"content-type": "image/png"}), 415,
           "uploaded file is unusable")
    _error(client.post("/api/search/image", content=b"", headers={"content-type": "image/png"}), 400, "empty upload")
    _error(client.post("/api/search/image", data={"field": "value"}), 415, "image/* Content-Type")


def test_clear_json_errors(served):
    client, _, _, _ = served
    _error(client.get("/api/search"), 400, "give a text query")
    _error(client.get("/api/search", params={"q": "x", "k": 0}), 400, "k:")
    _error(client.get("/api/search", params={"q": "x", "k": "many"}), 400, "k:")
    _error(client.get("/api/search", params={"q": "x", "after": "yesterday"}), 400, "invalid after")
    _error(client.get("/api/search", params={"q": "x", "min_width": -1}), 400, "min_width")
    _error(client.get("/api/nope"), 404, "Not Found")


def test_page_and_info(served):
    client, index, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200
    info = _ok(client.get("/api/info"))
    assert info["images"] == len(index) == 20 and info["model"] == index.model_spec
