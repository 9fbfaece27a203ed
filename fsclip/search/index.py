"""`ImageIndex`: one folder holding an image collection's vectors, metadata and FAISS index.

Layout of `my.idx/`:
    meta.sqlite          files (path, size, mtime, content hash, width, height, FAISS id), vectors,
                         bad files, roots, model spec / dim / fingerprint, schema version
    vectors-<gen>.faiss  the FAISS index of the published generation
    write.lock           held (flock) by the one process allowed to update
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image

from fsclip._io import atomic_dir
from fsclip._version import __version__
from fsclip.backends import Backend, load_model
from fsclip.backends.base import no_text_tower
from fsclip.backends.registry import BUNDLED
from fsclip.errors import DataError, IndexError_, UsageError
from fsclip.images import ImageLoadError, load_image
from fsclip.search import faiss_index as fi
from fsclip.search import store
from fsclip.search._scan import normpath
from fsclip.search.faiss_index import AnnConfig
from fsclip.search.query import Where, combine_queries

__all__ = ["ImageIndex", "SearchHit"]

logger = logging.getLogger(__name__)

LOCK_NAME = "write.lock"
MAX_K = 10_000
ImageQuery = str | os.PathLike | Image.Image


def faiss_name(gen: int) -> str:
    return f"vectors-{gen}.faiss"


@dataclass(frozen=True)
class SearchHit:
    path: str
    score: float
    id: int
    width: int | None
    height: int | None
    size: int  # bytes
    mtime: float  # seconds since the epoch

    def to_dict(self) -> dict:
        return asdict(self)


def _as_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, str | os.PathLike | Image.Image):
        return [x]
    return list(x)


def _spec_of(spec: str) -> str:
    """Folders are stored absolute so the index still finds its model from another working directory."""
    return spec if spec in BUNDLED or not os.path.isdir(spec) else os.path.abspath(spec)


class ImageIndex:
    """A searchable image collection on disk. Create with `create`, open with `open`.

    Readers see the published generation only; `add`, `update` and `remove` stage their changes and
    publish them at the end, so a concurrent reader sees the old state or the new one, never a mix.
    """

    def __init__(self, path: Path, info: dict[str, str], backend: Backend | None,
                 device: str | torch.device, dtype: str | torch.dtype | None):
        self.path = path
        self._info = info
        self._backend = backend
        self._device, self._dtype = device, dtype
        self._local = threading.local()
        self._cons: list = []
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._gen = -1
        self._faiss: faiss.Index | None = None
        self.refresh()

    # -- opening
    @classmethod
    def create(cls, path: str | os.PathLike, model: Backend | str, *, ann: AnnConfig | None = None,
               overwrite: bool = False, device: str | torch.device = "auto",
               dtype: str | torch.dtype | None = None) -> ImageIndex:
        """Create an empty index for `model` (a loaded backend or a spec). Atomic: all or nothing."""
        path = Path(path)
        if path.exists():
            if not overwrite:
                raise IndexError_(f"{path} already exists; open it, or overwrite it (--overwrite) to start over")
            if not (path / store.DB_NAME).is_file():
                raise IndexError_(f"{path} exists and is not an fsclip index; refusing to overwrite it")
        backend = model if isinstance(model, Backend) else load_model(model, device=device, dtype=dtype)
        ann = ann or AnnConfig()
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        info = {
            "fsclip_version": __version__, "model_spec": _spec_of(backend.spec), "backend": backend.name,
            "fingerprint": backend.fingerprint, "dim": backend.embed_dim, "has_text": int(backend.has_text),
            "generation": 0, "kind": "flat",
            "count": 0, "ann": json.dumps(asdict(ann)), "created": now, "updated": now,
        }
        with atomic_dir(path, overwrite=True) as tmp:
            con = sqlite3.connect(tmp / store.DB_NAME, isolation_level=None)
            try:
                store.create_schema(con, info)
            finally:
                con.close()
            fi.write_index(fi.new_flat(backend.embed_dim), tmp / faiss_name(0))
        logger.info("created index %s for model %s", path, backend.spec)
        return cls.open(path, backend, device=device, dtype=dtype)

    @classmethod
    def open(cls, path: str | os.PathLike, model: Backend | str | None = None, *,
             device: str | torch.device = "auto", dtype: str | torch.dtype | None = None) -> ImageIndex:
        """Open an existing index. Without `model`, the index's own model loads when a query needs it."""
        path = Path(path)
        if not path.is_dir():
            raise IndexError_(f"no index at {path}; build one with `fsclip index build PHOTOS --index {path}`")
        con = store.connect(path)
        try:
            info = store.read_info(con)
        finally:
            con.close()
        backend = None
        if model is not None:
            backend = model if isinstance(model, Backend) else load_model(model, device=device, dtype=dtype)
        index = cls(path, info, None, device, dtype)
        if backend is not None:
            index._check_model(backend)
            index._backend = backend
        return index

    def close(self) -> None:
        for con in self._cons:
            con.close()
        self._cons.clear()
        self._local = threading.local()

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what it is
    @property
    def dim(self) -> int:
        return int(self._info["dim"])

    @property
    def model_spec(self) -> str:
        return self._info["model_spec"]

    @property
    def fingerprint(self) -> str:
        return self._info["fingerprint"]

    @property
    def has_text(self) -> bool:
        """False for an image-only model's index: it answers image queries only."""
        return self._info.get("has_text", "1") != "0"  # indexes from before the key are CLIP ones

    @property
    def ann(self) -> AnnConfig:
        return AnnConfig(**json.loads(self._info["ann"]))

    @property
    def generation(self) -> int:
        return self._gen

    @property
    def kind(self) -> str:
        return fi.index_kind(self._faiss)

    def __len__(self) -> int:
        return int(self._faiss.ntotal)

    @property
    def backend(self) -> Backend:
        """The index's model, loaded on first use and checked against the recorded fingerprint."""
        with self._model_lock:
            if self._backend is None:
                backend = load_model(self.model_spec, device=self._device, dtype=self._dtype)
                self._check_model(backend)
                self._backend = backend
            return self._backend

    def _check_model(self, backend: Backend) -> None:
        if backend.embed_dim != self.dim or backend.fingerprint != self.fingerprint:
            raise IndexError_(
                f"index {self.path} was built with model {self.model_spec!r} (dim {self.dim}, fingerprint "
                f"{self.fingerprint}); model {backend.spec!r} (dim {backend.embed_dim}, fingerprint "
                f"{backend.fingerprint}) cannot query it: use the index's model (omit --model) or rebuild"
            )

    # -- state
    def _con(self):
        con = getattr(self._local, "con", None)
        if con is None:
            con = store.connect(self.path)
            self._local.con = con
            self._cons.append(con)
        return con

    def refresh(self) -> bool:
        """Pick up a newer published generation, if any. Returns True when it changed."""
        with self._lock:
            for _ in range(5):
                info = store.read_info(self._con())
                gen = int(info["generation"])
                if gen == self._gen:
                    return False
                try:
                    index = fi.read_index(self.path / faiss_name(gen))
                except RuntimeError:
                    # a writer published a newer generation and deleted this file in between; re-read
                    if (self.path / faiss_name(gen)).exists():
                        raise IndexError_(f"cannot read {self.path / faiss_name(gen)}: corrupt FAISS file") from None
                    time.sleep(0.05)
                    continue
                self._info, self._gen, self._faiss = info, gen, index
                return True
            raise IndexError_(f"index {self.path} changed repeatedly while opening; try again")

    @contextlib.contextmanager
    def _writer(self) -> Iterator:
        """The write lock (one updater per index; released by the OS if the process dies) and a connection."""
        import fcntl

        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise IndexError_(f"{self.path} is being updated by another process; wait for it to finish") from None
            con = store.connect(self.path, write=True)
            try:
                yield con
            finally:
                con.close()
        finally:
            os.close(fd)
        self.refresh()

    # -- changes
    def add(self, paths: Sequence[str | os.PathLike], *, batch_size: int = 32, num_workers: int | None = None,
            progress: bool = False):
        """Add image files/folders (remembered as roots for `update`) and index what is new or changed."""
        from fsclip.search.update import sync

        roots = [normpath(p) for p in _as_list(paths)]
        if not roots:
            raise UsageError("no paths given to add")
        missing = [r for r in roots if not os.path.exists(r)]
        if missing:
            raise DataError(f"no such file or folder: {missing[0]}")
        return sync(self, roots, register=True, batch_size=batch_size, num_workers=num_workers, progress=progress)

    def update(self, *, batch_size: int = 32, num_workers: int | None = None, progress: bool = False):
        """Re-scan every root: embed new and changed files, drop deleted ones, reuse vectors of moved ones."""
        from fsclip.search.update import sync

        return sync(self, None, register=False, batch_size=batch_size, num_workers=num_workers, progress=progress)

    def remove(self, paths: Sequence[str | os.PathLike]) -> int:
        """Remove files, or everything under folders; they stay out on later updates. Returns the count."""
        from fsclip.search.update import remove

        return remove(self, [normpath(p) for p in _as_list(paths)])

    # -- reading
    def roots(self) -> list[str]:
        return [r[0] for r in self._con().execute("SELECT path FROM roots ORDER BY path")]

    def errors(self) -> list[dict]:
        """Bad files skipped by builds: `{"path", "reason"}`."""
        return [dict(path=r["path"], reason=r["reason"])
                for r in self._con().execute("SELECT path, reason FROM errors ORDER BY path")]

    def lookup(self, path: str) -> SearchHit | None:
        """The indexed entry stored under exactly `path` (score 1.0), or None. Never touches the disk."""
        row = self._con().execute(
            f"SELECT * FROM files WHERE path = :path AND {store.VISIBLE}", {"path": path, "gen": self._gen}
        ).fetchone()
        return None if row is None else _hit(row, 1.0)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All visible `(ids (N,), vectors (N, D))`, in id order."""
        parts = list(store.iter_vectors(self._con(), store.VISIBLE, {"gen": self._gen}, self.dim))
        if not parts:
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def info(self) -> dict:
        self.refresh()
        con = self._con()
        info = self._info
        pending = con.execute("SELECT count(*) FROM files WHERE added_gen > ? AND removed_gen IS NULL",
                              (self._gen,)).fetchone()[0]
        n_err = con.execute("SELECT count(*) FROM errors").fetchone()[0]
        kind = self.kind
        index = {"kind": kind}
        if kind == "ivf":
            index.update(nlist=int(info.get("nlist", 0)), nprobe=int(info.get("nprobe", 0)),
                         tuned_recall_at_10=float(info.get("tuned_recall", "nan")))
        return {
            "path": str(self.path), "images": len(self), "bad_files": n_err, "model": self.model_spec,
            "has_text": self.has_text,
            "backend": info.get("backend"), "fingerprint": self.fingerprint, "dim": self.dim, "index": index,
            "generation": self._gen, "pending": pending, "roots": self.roots(),
            "excluded": [r[0] for r in con.execute("SELECT path FROM excludes ORDER BY path")],
            "ann_threshold": self.ann.ann_threshold, "schema_version": int(info["schema_version"]),
            "fsclip_version": info.get("fsclip_version"), "created": info.get("created"),
            "updated": info.get("updated"),
            "disk_bytes": sum(f.stat().st_size for f in self.path.iterdir() if f.is_file()),
        }

    # -- queries
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 normalised text features from the index's model."""
        if not self.has_text:
            raise UsageError(no_text_tower(self.model_spec, "this index answers image queries only (--image PATH)"))
        backend = self.backend
        with self._model_lock:
            return backend.encode_texts(list(texts)).cpu().numpy()

    def encode_image(self, image: ImageQuery) -> np.ndarray:
        """One image -> (D,). An indexed path reuses its stored vector; anything else is encoded."""
        if not isinstance(image, Image.Image):
            path = normpath(image)
            hit = self.lookup(path)
            if hit is not None:
                return store.vectors_for(self._con(), [hit.id], self.dim)[0]
            try:
                image = load_image(path)
            except ImageLoadError as e:
                raise DataError(f"cannot use query image {os.fspath(image)}: {e}") from None
        backend = self.backend
        with self._model_lock:
            pixels = backend.preprocess(image)[None]  # (1, 3, H, W)
            return backend.encode_images(pixels)[0].cpu().numpy()

    def search(self, text: str | Sequence[str] | None = None, image: ImageQuery | Sequence[ImageQuery] | None = None,
               *, negative_text: str | Sequence[str] | None = None,
               negative_image: ImageQuery | Sequence[ImageQuery] | None = None, negative_weight: float = 0.5,
               k: int = 10, where: Where | dict | None = None) -> list[SearchHit]:
        """Top-k images for the combined query: mean of the positives minus `negative_weight` x mean of the negatives.

        Args:
            text: one or more positive text queries.
            image: one or more positive example images: indexed paths (their stored vector is used),
                other files, or PIL images.
            negative_text, negative_image: what results should be unlike.
            negative_weight: weight of the negatives' mean similarity in the score.
            k: number of results.
            where: metadata filter (`Where` or a dict of its fields).
        """
        pos = [*self._text_rows(text), *(self.encode_image(x) for x in _as_list(image))]
        neg = [*self._text_rows(negative_text), *(self.encode_image(x) for x in _as_list(negative_image))]
        query = combine_queries(torch.from_numpy(np.stack(pos)) if pos else torch.empty(0, self.dim),
                                torch.from_numpy(np.stack(neg)) if neg else None, negative_weight)
        return self.search_vectors(query.numpy()[None], k=k, where=where)[0]

    def _text_rows(self, text) -> list[np.ndarray]:
        texts = _as_list(text)
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise UsageError("text queries must be non-empty strings")
        return list(self.encode_text(texts)) if texts else []

    def search_vectors(self, queries: np.ndarray, k: int = 10, where: Where | dict | None = None) -> list[list[SearchHit]]:
        """(B, D) query vectors -> B ranked hit lists (fewer than k when the filter or index is small)."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
            raise UsageError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise UsageError(f"query vectors must have shape (B, {self.dim}), got {tuple(queries.shape)}")
        self.refresh()
        index, gen, con = self._faiss, self._gen, self._con()
        where = Where.from_dict(where)
        allowed = None
        if where is not None and not where.is_empty():
            cond, params = where.to_sql()
            allowed = store.ids_where(con, f"{store.VISIBLE} AND ({cond})", {"gen": gen, **params})
            if len(allowed) == 0:
                return [[] for _ in queries]
        scores, ids = fi.search(index, queries, int(k), allowed)
        rows = store.rows_for(con, {int(i) for i in ids.ravel() if i >= 0})
        return [[_hit(rows[int(i)], float(s)) for s, i in zip(srow, irow) if i >= 0 and int(i) in rows]
                for srow, irow in zip(scores, ids)]

    def __repr__(self) -> str:
        return f"ImageIndex({str(self.path)!r}, images={len(self)}, model={self.model_spec!r}, kind={self.kind!r})"


def _hit(row, score: float) -> SearchHit:
    return SearchHit(path=row["path"], score=score, id=int(row["id"]), width=row["width"], height=row["height"],
                     size=int(row["size"]), mtime=row["mtime_ns"] / 1e9)
