"""HTTP JSON API and web page over one `ImageIndex` (FastAPI; run it with `fsclip serve`).

Routes:
    GET  /                    the search page
    GET  /api/info            index summary
    GET  /api/search          ?q=TEXT (repeatable) &like=INDEXED_PATH (repeatable) &minus=TEXT &k= + filters
    POST /api/search/image    an uploaded image (multipart field or raw body) &k= + filters
    GET  /api/thumb?path=P    JPEG thumbnail of an indexed image
    GET  /api/image?path=P    the indexed image file itself

Only paths stored in the index are ever read or served: a request's path is looked up verbatim, so
`../` tricks and absolute paths outside the collection simply are not found. Errors are JSON
`{"error": "..."}` with a fitting status code.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at
# runtime, and those refer to names local to `build_app`.
import functools
import io
import logging
import os
import tempfile
import time
from importlib import resources
from typing import Annotated
from urllib.parse import quote

from fsclip.errors import FsclipError, IndexError_, UsageError
from fsclip.images import ImageLoadError, load_image
from fsclip.search.index import ImageIndex, SearchHit
from fsclip.search.query import Where, parse_time

__all__ = ["build_app"]

logger = logging.getLogger(__name__)

MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around the file itself
_SECURE_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
_PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
             "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
_FILE_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; sandbox"  # an SVG can't run script


def _import_fastapi():
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (form uploads)
    except ImportError as e:
        raise UsageError(f"the web service needs the 'serve' extra ({e.name} is missing): "
                         "pip install 'fsclip[serve]'") from None


def build_app(index: ImageIndex, *, max_upload_bytes: int = 20 * 2**20, thumb_size: int = 256,
              default_k: int = 24, max_k: int = 500):
    """The FastAPI app serving `index`; the index's model is used for text and upload queries."""
    _import_fastapi()
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if max_upload_bytes < 1:
        raise UsageError(f"max_upload_bytes must be positive, got {max_upload_bytes}")
    Texts = Annotated[list[str] | None, Query()]  # repeatable: ?q=a&q=b
    TopK = Annotated[int, Query(ge=1, le=max_k)]
    Weight = Annotated[float, Query(ge=0, le=10)]
    static = resources.files("fsclip.search") / "static"
    app = FastAPI(title="fsclip search", docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=_SECURE_HEADERS)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body"))
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return error(400, "; ".join(parts) or "invalid request")

    @app.exception_handler(FsclipError)
    async def _fsclip_error(request, exc):
        status = 415 if isinstance(exc, ImageLoadError) else 500 if isinstance(exc, IndexError_) else 400
        return error(status, str(exc))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        logger.exception("internal error on %s", request.url.path)
        return error(500, "internal error; see the server log")

    def where(glob, prefix, after, before, min_width, max_width, min_height, max_height) -> Where:
        return Where(
            path_glob=glob, path_prefix=prefix,
            modified_after=None if after is None else parse_time(after, "after"),
            modified_before=None if before is None else parse_time(before, "before"),
            min_width=min_width, max_width=max_width, min_height=min_height, max_height=max_height,
        )

    def hit_json(hit: SearchHit) -> dict:
        q = quote(hit.path, safe="")
        return {**hit.to_dict(), "thumb": f"/api/thumb?path={q}", "image": f"/api/image?path={q}"}

    def results(hits: list[SearchHit], t0: float) -> dict:
        return {"results": [hit_json(h) for h in hits], "count": len(hits),
                "took_ms": round((time.perf_counter() - t0) * 1000, 2)}

    def indexed(path: str) -> SearchHit:
        index.refresh()
        hit = index.lookup(path)
        if hit is None:
            raise HTTPException(404, f"not in the index: {path}")
        return hit

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
        for path in like:
            indexed(path)  # only stored vectors: never reads a file named by the request
        hits = index.search(text=texts, image=like, negative_text=[t for t in minus or () if t.strip()],
                            negative_weight=negative_weight, k=k,
                            where=where(glob, prefix, after, before, min_width, max_width, min_height, max_height))
        return results(hits, t0)

    async def read_upload(request: Request) -> bytes:
        limit = max_upload_bytes
        too_big = f"upload too large: the limit is {limit} bytes"
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
            raise HTTPException(413, too_big)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit + MULTIPART_SLACK:
                raise HTTPException(413, too_big)
        if request.headers.get("content-type", "").startswith(("multipart/form-data",
                                                               "application/x-www-form-urlencoded")):
            async def replay():
                return {"type": "http.request", "body": bytes(body), "more_body": False}

            form = await Request(request.scope, replay).form(max_files=1, max_fields=20)
            upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
            if upload is None:
                raise HTTPException(400, "no file in the upload; send the image as a multipart file field")
            data = await upload.read()
        else:
            data = bytes(body)
        if len(data) > limit:
            raise HTTPException(413, too_big)
        if not data:
            raise HTTPException(400, "empty upload")
        return data

    def search_upload(data: bytes, k: int, minus: list[str], negative_weight: float, flt: Where):
        fd, tmp = tempfile.mkstemp(prefix="fsclip-upload-", suffix=".img")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                img = load_image(tmp)  # same decoding rules (and pixel limit) as indexing
            except ImageLoadError as e:
                raise ImageLoadError(f"uploaded file is unusable: {e}") from None
        finally:
            os.unlink(tmp)
        return index.search(image=img, negative_text=minus, negative_weight=negative_weight, k=k, where=flt)

    @app.post("/api/search/image")
    async def search_image(request: Request, k: TopK = default_k, minus: Texts = None,
                           negative_weight: Weight = 0.5, glob: str | None = None, prefix: str | None = None, after: str | None = None,
                           before: str | None = None, min_width: int | None = None, max_width: int | None = None,
                           min_height: int | None = None, max_height: int | None = None):
        t0 = time.perf_counter()
        flt = where(glob, prefix, after, before, min_width, max_width, min_height, max_height)
        data = await read_upload(request)
        hits = await run_in_threadpool(search_upload, data, k, [t for t in minus or () if t.strip()],
                                       negative_weight, flt)
        return results(hits, t0)

    @functools.lru_cache(maxsize=4096)
    def thumbnail(path: str, size: int, mtime: float) -> bytes:  # mtime: a changed file gets a new entry
        img = load_image(path, draft_size=thumb_size)
        img.thumbnail((thumb_size, thumb_size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        return buf.getvalue()

    @app.get("/api/thumb")
    def thumb(path: str):
        hit = indexed(path)
        try:
            data = thumbnail(hit.path, hit.size, hit.mtime)
        except ImageLoadError as e:
            raise HTTPException(404 if "no such file" in str(e) else 415, f"{path}: {e}") from None
        return Response(data, media_type="image/jpeg",
                        headers={**_SECURE_HEADERS, "Cache-Control": "private, max-age=3600"})

    @app.get("/api/image")
    def image(path: str):
        hit = indexed(path)
        if not os.path.isfile(hit.path):
            raise HTTPException(404, f"file no longer exists: {path}")
        return FileResponse(hit.path, headers={**_SECURE_HEADERS, "Content-Security-Policy": _FILE_CSP},
                            content_disposition_type="inline")

    return app
