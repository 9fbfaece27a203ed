"""HTTP JSON API and web page over one `ImageIndex` (FastAPI; run it with `fsclip serve`).

Routes:
    GET  /                    the search page
    GET  /api/info            index summary
    GET  /api/search          ?q=TEXT (repeatable) &like=INDEXED_PATH (repeatable) &minus=TEXT &k= + filters
    POST /api/search/image    the query image as the request body (Content-Type image/*) &k= + filters
    GET  /api/thumb?path=P    JPEG thumbnail of an indexed image
    GET  /api/image?path=P    the indexed image file itself

What it defends against (a server on 127.0.0.1 is still reachable from every web page the user opens,
and from anyone who can write to the photo folders):

* Only indexed files are read, and only as they were indexed: a request's path is looked up verbatim
  in the index (`../` tricks and other paths are simply not found), and the file must still be the
  regular file that was embedded, under an indexed folder (`_files.open_indexed`); a swapped-in
  symlink, hard link or FIFO is refused.
* Requests must name this server in their `Host` header (`allowed_hosts`), which stops DNS rebinding.
* Uploads must be sent as `image/*` bodies: a foreign page can only POST forms (`multipart/form-data`,
  `text/plain`, urlencoded) without a CORS preflight, so those are refused (415). Their decoded size
  is capped (`max_upload_pixels`) before any pixel is decoded, and at most `max_busy` uploads and
  thumbnail decodes run at once; others wait up to `busy_timeout` seconds, then get 503.
* Every request answers from one index snapshot; when the index is updated or replaced
  (`index build --overwrite`) the next request uses the new one.

Errors are JSON `{"error": "..."}` with a fitting status code.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at
# runtime, and those refer to names local to `build_app`.
import contextlib
import io
import logging
import mimetypes
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from importlib import resources
from typing import Annotated
from urllib.parse import quote

from fsclip._paths import display_path
from fsclip.errors import FsclipError, IndexError_, UsageError
from fsclip.images import DEFAULT_MAX_PIXELS, ImageLoadError
from fsclip.search._files import NotServable, decode, iter_chunks, open_indexed, parse_display_path
from fsclip.search.index import ImageIndex, SearchHit, Snapshot
from fsclip.search.query import Where, check_glob, parse_time

__all__ = ["LOCAL_HOSTS", "build_app"]

logger = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# 25 megapixels cover any phone photo (after JPEG draft decoding, far larger JPEGs too) and cost about
# 75 MB as RGB; PIL's own limit for files (179 MP) would let a 37 KB PNG claim 1 GB per request.
UPLOAD_MAX_PIXELS = 25_000_000
THUMB_CACHE = 4096  # thumbnails kept in memory (about 10 KB each)
UPLOAD_DRAFT = 512  # JPEG uploads decode at >= 512 px a side: plenty for any model input
_SECURE_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
_PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
             "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
_FILE_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; sandbox"  # an SVG can't run script


def _import_fastapi():
    try:
        import fastapi  # noqa: F401
    except ImportError as e:
        raise UsageError(f"the web service needs the 'serve' extra ({e.name} is missing): "
                         "pip install 'fsclip[serve]'") from None


def build_app(index: ImageIndex, *, max_upload_bytes: int = 20 * 2**20,
              max_upload_pixels: int = UPLOAD_MAX_PIXELS, thumb_size: int = 256, default_k: int = 24,
              max_k: int = 500, allowed_hosts: Sequence[str] = LOCAL_HOSTS, max_busy: int = 2,
              busy_timeout: float = 30.0):
    """The FastAPI app serving `index`; the index's model is used for text and upload queries.

    Args:
        allowed_hosts: `Host` header values (without port) accepted; `["*"]` accepts any.
        max_busy: image decodes (uploads, thumbnails) running at once; bounds memory.
        busy_timeout: seconds a request waits for a decode slot before a 503.
    """
    _import_fastapi()
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    for name, value in (("max_upload_bytes", max_upload_bytes), ("max_upload_pixels", max_upload_pixels),
                        ("max_busy", max_busy)):
        if value < 1:
            raise UsageError(f"{name} must be positive, got {value}")
    Texts = Annotated[list[str] | None, Query()]  # repeatable: ?q=a&q=b
    TopK = Annotated[int, Query(ge=1, le=max_k)]
    Weight = Annotated[float, Query(ge=0, le=10)]
    static = resources.files("fsclip.search") / "static"
    app = FastAPI(title="fsclip search", docs_url=None, redoc_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    busy = threading.BoundedSemaphore(max_busy)
    app.state.busy = busy

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers={**_SECURE_HEADERS, **(headers or {})})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body"))
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return error(400, "; ".join(parts) or "invalid request")

    @app.exception_handler(FsclipError)
    async def _fsclip_error(request, exc):
        # IndexError_: the index is damaged, replaced by one for another model, or being replaced
        status = 415 if isinstance(exc, ImageLoadError) else 503 if isinstance(exc, IndexError_) else 400
        return error(status, str(exc))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        logger.exception("internal error on %s", request.url.path)
        return error(500, "internal error; see the server log")

    def too_busy() -> HTTPException:
        return HTTPException(503, f"busy: {max_busy} images are being decoded; retry shortly",
                             headers={"Retry-After": "5"})

    @contextlib.contextmanager
    def decode_slot():
        if not busy.acquire(timeout=busy_timeout):
            raise too_busy()
        try:
            yield
        finally:
            busy.release()

    def where(glob, prefix, after, before, min_width, max_width, min_height, max_height) -> Where:
        if glob:
            check_glob(glob, "glob")
        return Where(
            path_glob=glob, path_prefix=prefix,
            modified_after=None if after is None else parse_time(after, "after"),
            modified_before=None if before is None else parse_time(before, "before"),
            min_width=min_width, max_width=max_width, min_height=min_height, max_height=max_height,
        )

    def hit_json(hit: SearchHit) -> dict:
        shown = display_path(hit.path)  # JSON must be valid UTF-8; `indexed` maps the escapes back
        q = quote(shown, safe="")
        return {**hit.to_dict(), "path": shown, "thumb": f"/api/thumb?path={q}", "image": f"/api/image?path={q}"}

    def results(hits: list[SearchHit], t0: float) -> dict:
        return {"results": [hit_json(h) for h in hits], "count": len(hits),
                "took_ms": round((time.perf_counter() - t0) * 1000, 2)}

    def indexed(path: str, snap: Snapshot) -> SearchHit:
        hit = index.lookup(path, snap)
        if hit is None and (stored := parse_display_path(path)) is not None:
            hit = index.lookup(stored, snap)
        if hit is None:
            raise HTTPException(404, f"not in the index: {path}")
        return hit

    def open_file(hit: SearchHit, snap: Snapshot):
        """The indexed file of `hit`, open, if it is still the file that was indexed; else 404."""
        try:
            return open_indexed(hit.path, index.identity(hit, snap), index.roots())
        except NotServable as e:
            raise HTTPException(404, f"not served: {display_path(hit.path)}: {e}") from None

    @app.get("/", response_class=HTMLResponse)
    def page():
        html = (static / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={**_SECURE_HEADERS, "Content-Security-Policy": _PAGE_CSP})

    @app.get("/api/info")
    def info():
        d = index.info()
        return {k: d[k] for k in ("images", "bad_files", "model", "has_text", "dim", "index", "generation", "updated")}

    @app.get("/api/search")
    def search(q: Texts = None, like: Texts = None, minus: Texts = None, k: TopK = default_k,
               negative_weight: Weight = 0.5, glob: str | None = None, prefix: str | None = None,
               after: str | None = None, before: str | None = None, min_width: int | None = None,
               max_width: int | None = None, min_height: int | None = None, max_height: int | None = None):
        t0 = time.perf_counter()
        texts, like = [t for t in q or () if t.strip()], like or []
        if not texts and not like:
            raise HTTPException(400, "give a text query (q=...) or an indexed image (like=PATH)")
        flt = where(glob, prefix, after, before, min_width, max_width, min_height, max_height)
        snap = index.snapshot()  # one state for the whole request: lookups, vectors, FAISS, filter
        like = [indexed(path, snap).path for path in like]  # stored vectors only: never reads a named file
        hits = index.search(text=texts, image=like, negative_text=[t for t in minus or () if t.strip()],
                            negative_weight=negative_weight, k=k, where=flt, snapshot=snap)
        return results(hits, t0)

    async def read_upload(request: Request) -> bytes:
        limit = max_upload_bytes
        too_big = f"upload too large: the limit is {limit} bytes"
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, too_big)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, too_big)
        if not body:
            raise HTTPException(400, "empty upload")
        return bytes(body)

    def search_upload(data: bytes, k: int, minus: list[str], negative_weight: float, flt: Where):
        try:
            img = decode(data, max_pixels=max_upload_pixels, draft_size=UPLOAD_DRAFT)
        except ImageLoadError as e:
            raise ImageLoadError(f"uploaded file is unusable: {e}") from None
        return index.search(image=img, negative_text=minus, negative_weight=negative_weight, k=k, where=flt)

    @app.post("/api/search/image")
    async def search_image(request: Request, k: TopK = default_k, minus: Texts = None,
                           negative_weight: Weight = 0.5, glob: str | None = None, prefix: str | None = None,
                           after: str | None = None, before: str | None = None, min_width: int | None = None,
                           max_width: int | None = None, min_height: int | None = None,
                           max_height: int | None = None):
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not ctype.startswith("image/"):
            raise HTTPException(415, f"send the image itself as the request body with an image/* Content-Type, "
                                     f"not {ctype or 'no Content-Type'} (e.g. curl --data-binary @q.jpg "
                                     "-H 'Content-Type: image/jpeg')")
        flt = where(glob, prefix, after, before, min_width, max_width, min_height, max_height)
        if not await run_in_threadpool(busy.acquire, timeout=busy_timeout):  # waits off the event loop
            raise too_busy()
        try:  # the body is read inside the slot too: at most max_busy uploads are held in memory
            data = await read_upload(request)
            hits = await run_in_threadpool(search_upload, data, k, [t for t in minus or () if t.strip()],
                                           negative_weight, flt)
        finally:
            busy.release()
        return results(hits, t0)

    thumbs: OrderedDict[int, bytes] = OrderedDict()  # entry id -> JPEG; a changed file gets a new id
    thumbs_lock = threading.Lock()

    def thumbnail(hit: SearchHit, snap: Snapshot) -> bytes:
        with thumbs_lock:
            if hit.id in thumbs:
                thumbs.move_to_end(hit.id)
                return thumbs[hit.id]
        with open_file(hit, snap) as f, decode_slot():
            img = decode(f, max_pixels=DEFAULT_MAX_PIXELS, draft_size=thumb_size)
        img.thumbnail((thumb_size, thumb_size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        with thumbs_lock:
            thumbs[hit.id] = buf.getvalue()
            if len(thumbs) > THUMB_CACHE:
                thumbs.popitem(last=False)
        return buf.getvalue()

    @app.get("/api/thumb")
    def thumb(path: str):
        snap = index.snapshot()
        hit = indexed(path, snap)
        try:
            data = thumbnail(hit, snap)
        except ImageLoadError as e:
            raise HTTPException(415, f"{path}: {e}") from None
        return Response(data, media_type="image/jpeg",
                        headers={**_SECURE_HEADERS, "Cache-Control": "private, max-age=3600"})

    @app.get("/api/image")
    def image(path: str):
        snap = index.snapshot()
        hit = indexed(path, snap)
        f = open_file(hit, snap)
        media_type = mimetypes.guess_type(display_path(hit.path))[0] or "application/octet-stream"
        return StreamingResponse(iter_chunks(f), media_type=media_type,
                                 headers={**_SECURE_HEADERS, "Content-Security-Policy": _FILE_CSP,
                                          "Content-Disposition": "inline", "Content-Length": str(hit.size)})

    return app
