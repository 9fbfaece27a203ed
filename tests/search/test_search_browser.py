"""The search page in a real headless Chromium: type a query, see results, click one for similar images."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time

import pytest
from searchutil import render_photos

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason="needs Debian's chromium (apt-get install -y chromium); not installed"),
]


@contextlib.contextmanager
def _serving(index):
    """`index`'s page and API on a free local port, in a thread; yields the base URL."""
    import uvicorn

    from fsclip.search.service import build_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(build_app(index), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_backend):
    pytest.importorskip("uvicorn")
    from fsclip.search import ImageIndex

    root = tmp_path_factory.mktemp("browser")
    render_photos(root / "photos", 30, seed=31, size=48)
    index = ImageIndex.create(root / "b.idx", tiny_backend)
    index.add([root / "photos"])
    with _serving(index) as url:
        yield url, index


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    sync_api.expect.set_options(timeout=20_000)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_type_query_see_results_click_for_similar(server, page):
    from playwright.sync_api import expect

    url, index = server
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))

    # the page's CSP forbids eval, so waits use locators (wait_for_function would need eval)
    page.goto(url)
    expect(page.locator("#info")).to_contain_text("30 images")
    page.select_option("#k", "12")
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    hits = page.locator("#results .hit")
    expect(hits).to_have_count(12)
    expect(page.locator("#status")).to_contain_text("12 results for “a red circle”")
    paths = page.eval_on_selector_all("#results .hit", "els => els.map(e => e.dataset.path)")
    assert paths == [h.path for h in index.search(text="a red circle", k=12)]
    scores = page.eval_on_selector_all("#results .hit .score", "els => els.map(e => Number(e.textContent))")
    assert scores == sorted(scores, reverse=True)
    # thumbnails really load (served from the index, decoded by the browser)
    for i in range(4):
        img = hits.nth(i).locator("img")
        img.scroll_into_view_if_needed()
        expect(img).to_have_js_property("complete", True)
        assert img.evaluate("i => i.naturalWidth") > 0

    clicked = paths[5]
    hits.nth(5).click()
    expect(page.locator("#status")).to_contain_text("similar to")
    expect(hits.first).to_have_attribute("data-path", clicked)
    first_score = float(hits.first.locator(".score").text_content())
    assert first_score == pytest.approx(1.0, abs=1e-3)  # the clicked image is its own best match
    assert [e for e in page.eval_on_selector_all("#results .hit", "els => els.map(e => e.dataset.path)")] == [
        h.path for h in index.search(image=clicked, k=12)]
    assert not problems, problems


def test_errors_show_in_the_page(server, page):
    from playwright.sync_api import expect

    url, _ = server
    page.goto(url)
    page.fill("#q", "")
    page.press("#q", "Enter")
    expect(page.locator("#status")).to_contain_text("Type what you are looking for")
    page.set_input_files("#upload", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"}])
    expect(page.locator("#status")).to_contain_text("uploaded file is unusable")
    expect(page.locator("#status")).to_have_class("error")


def test_upload_an_image_to_find_it(server, page):
    """The page sends the file itself (image/*), which is what the server accepts; the same picture ranks first."""
    from playwright.sync_api import expect

    url, index = server
    target = index.search(text="a blue star", k=1)[0].path
    page.goto(url)
    page.set_input_files("#upload", files=[{"name": "query.png", "mimeType": "image/png",
                                            "buffer": open(target, "rb").read()}])
    expect(page.locator("#status")).to_contain_text("similar to query.png")
    expect(page.locator("#results .hit").first).to_have_attribute("data-path", target)


@pytest.fixture(scope="module")
def image_only_server(tmp_path_factory, tiny_timm_dir):
    """The page over an index whose model has no text tower (a timm CNN)."""
    pytest.importorskip("uvicorn")
    from fsclip.search import ImageIndex

    root = tmp_path_factory.mktemp("browser-image-only")
    photos = render_photos(root / "photos", 12, seed=32, size=48)
    index = ImageIndex.create(root / "i.idx", str(tiny_timm_dir), device="cpu")
    index.add([root / "photos"])
    with _serving(index) as url:
        yield url, index, photos


def test_image_only_index_hides_the_text_box(image_only_server, page):
    from playwright.sync_api import expect

    url, index, photos = image_only_server
    page.goto(url)
    expect(page.locator("#info")).to_contain_text("12 images")
    expect(page.locator("#q")).to_be_hidden()
    expect(page.locator("#go")).to_be_hidden()
    expect(page.locator("#status")).to_contain_text("searches by image")
    page.select_option("#k", "12")
    page.set_input_files("#upload", str(photos[4]))
    hits = page.locator("#results .hit")
    expect(hits).to_have_count(12)
    expect(page.locator("#status")).to_contain_text(f"similar to {photos[4].name}")
    # the upload is encoded afresh: the same file ranks first
    expect(hits.first).to_have_attribute("data-path", str(photos[4]))
