"""Hostile requests to the web service: pixel bombs, cross-site form posts, DNS rebinding, busy ports."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import time
import zlib

import pytest
from _search_util import REPO, photos, tiny_backend  # noqa: F401

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from fsclip.search import ImageIndex  # noqa: E402
from fsclip.search.service import build_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_backend):  # noqa: F811
    root = tmp_path_factory.mktemp("requests")
    paths = photos(root / "photos", 5)
    index = ImageIndex.create(root / "p.idx", tiny_backend)
    index.add([root / "photos"])
    return index, paths, root


def _client(index, **kw) -> TestClient:
    return TestClient(build_app(index, **kw), base_url="http://127.0.0.1:8000")


def _pixel_bomb_png(side: int = 13_000) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: ~40 KB of file, 169 megapixels decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_upload_of_a_37kb_png_declaring_13000x13000_pixels(served):
    index, _, _ = served
    bomb = _pixel_bomb_png()
    assert len(bomb) < 100_000
    t0 = time.perf_counter()
    resp = _client(index).post("/api/search/image", content=bomb, headers={"content-type": "image/png"})
    assert resp.status_code == 415, resp.text
    assert "image too large: 13000x13000 pixels is over the 25000000-pixel limit" in resp.json()["error"]
    assert time.perf_counter() - t0 < 5  # refused from the header (decoding it took ~1 GB and seconds)


@pytest.mark.parametrize("how", ["multipart-form", "text-plain", "urlencoded"])
def test_upload_posted_by_a_foreign_page_as_a_form(served, how):
    """What a page on another site can send without a CORS preflight is refused, even if it is an image."""
    index, paths, _ = served
    client, data = _client(index), paths[0].read_bytes()
    if how == "multipart-form":
        resp = client.post("/api/search/image", files={"image": ("q.png", data, "image/png")})
    elif how == "text-plain":
        resp = client.post("/api/search/image", content=data, headers={"content-type": "text/plain"})
    else:
        resp = client.post("/api/search/image", data={"image": "x"})
    assert resp.status_code == 415 and "image/* Content-Type" in resp.json()["error"], resp.text
    ok = client.post("/api/search/image", content=data, headers={"content-type": "image/png"})
    assert ok.status_code == 200 and ok.json()["results"][0]["path"] == str(paths[0])


def test_uploads_beyond_the_concurrent_decode_limit(served):
    """With every decode slot taken, an upload waits its turn, then gets 503 rather than more memory."""
    index, paths, _ = served
    app = build_app(index, max_busy=1, busy_timeout=0.2)
    client = TestClient(app, base_url="http://127.0.0.1")
    data = paths[1].read_bytes()
    assert app.state.busy.acquire(timeout=1)  # a decode in flight
    try:
        resp = client.post("/api/search/image", content=data, headers={"content-type": "image/png"})
        assert resp.status_code == 503 and resp.headers["retry-after"] == "5", resp.text
    finally:
        app.state.busy.release()
    assert client.post("/api/search/image", content=data, headers={"content-type": "image/png"}).status_code == 200


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.1.nip.io"])
def test_dns_rebinding_request_with_a_foreign_host_header(served, host):
    index, paths, _ = served
    client = _client(index)
    for route in ("/api/info", f"/api/image?path={paths[0]}", "/api/search?q=x"):
        resp = client.get(route, headers={"host": host})
        assert resp.status_code == 400 and b"\x89PNG" not in resp.content, (route, resp.text)
    for ok in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "localhost"):
        assert client.get("/api/info", headers={"host": ok}).status_code == 200
    named = TestClient(build_app(index, allowed_hosts=["photos.lan"]), base_url="http://photos.lan")
    assert named.get("/api/info").status_code == 200  # --allow-host photos.lan


def _serve(idx, *args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)}
    return subprocess.Popen([sys.executable, "-m", "fsclip", "serve", str(idx), "--device", "cpu", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/")


def test_serve_on_a_port_already_in_use(served):
    _, _, root = served
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve(root / "p.idx", "--port", str(port))
        try:
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 2 and "serving" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"fsclip: error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_serve_on_port_0_announces_the_port_it_got(served):
    httpx = pytest.importorskip("httpx")
    _, _, root = served
    proc = _serve(root / "p.idx", "--port", "0")
    try:
        line = proc.stderr.readline()
        match = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
        assert match, line + (proc.stderr.read() if proc.poll() is not None else "")
        port = int(match[1])
        assert port != 0
        assert httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=30).json()["images"] == 5
    finally:
        proc.terminate()
        proc.wait(10)
