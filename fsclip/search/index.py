"""`ImageIndex`: one folder holding an image collection's vectors, metadata and FAISS index.

Layout of `my.idx/`:
    meta.sqlite          files (path, size, mtime, inode, content hash, width, height, FAISS id), vectors,
                         bad files, roots, model spec / dim / fingerprint, index id, schema version,
                         the published generation and its FAISS file's checksum
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
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from fsclip._io import atomic_dir, recover_dir
from fsclip._paths import display_path
from fsclip._version import __version__
from fsclip.backends import Backend, load_model
from fsclip.backends.base import no_text_tower
from fsclip.backends.registry import BUNDLED
from fsclip.errors import DataError, IndexError_, UsageError
from fsclip.images import ImageLoadError, load_image
from fsclip.search import _snapshot, store
from fsclip.search import faiss_index as fi
from fsclip.search._scan import check_root, normpath
from fsclip.search._snapshot import Snapshot, faiss_name
from fsclip.search.faiss_index import AnnConfig
from fsclip.search.query import Where, combine_queries

__all__ = ["FileIdentity", "ImageIndex", "IndexChangedError", "SearchHit", "Snapshot"]

logger = logging.getLogger(__name__)

LOCK_NAME = "write.lock"
MAX_K = 10_000
ImageQuery = str | os.PathLike | Image.Image


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


class IndexChangedError(IndexError_):
    """The index folder was replaced under a running reader in a way it cannot follow (another model)."""


class ImageIndex:
    """A searchable image collection on disk. Create with `create`, open with `open`.

    Readers see the published generation only; `add`, `update` and `remove` stage their changes and
    publish them at the end, so a concurrent reader sees the old state or the new one, never a mix.
    Each read works on one `Snapshot` (see `snapshot()`); pass the same one to several calls (as the
    web service does per request) to answer them all from one state.
    """

    def __init__(self, path: Path, backend: Backend | None, device: str | torch.device,
                 dtype: str | torch.dtype | None, runtime: str = "torch"):
        self.path = path
        self._backend = backend
        self._device, self._dtype, self._runtime = device, dtype, runtime
        self._local = threading.local()
        self._cons: list = []
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._snap: Snapshot | None = None
        self.refresh()

    # -- opening
    @classmethod
    def create(cls, path: str | os.PathLike, model: Backend | str, *, ann: AnnConfig | None = None,
               overwrite: bool = False, device: str | torch.device = "auto",
               dtype: str | torch.dtype | None = None, runtime: str = "torch",
               calibration: Sequence | None = None) -> ImageIndex:
        """Create an empty index for `model` (a loaded backend or a spec). Atomic: all or nothing.

        `runtime` (see `fsclip.runtime`) runs the model when `model` is a spec, and later queries;
        an ONNX runtime used for the first time is gated on the first images of `calibration` (e.g. the
        folders about to be added).
        """
        path = Path(path)
        recover_dir(path)  # an overwrite that crashed midway: its old index is back before we look
        if path.exists():
            if not overwrite:
                raise IndexError_(f"{path} already exists; open it, or overwrite it (--overwrite) to start over")
            if not (path / store.DB_NAME).is_file():
                raise IndexError_(f"{path} exists and is not an fsclip index; refusing to overwrite it")
        backend = model if isinstance(model, Backend) else load_model(model, device=device, dtype=dtype,
                                                                      runtime=runtime, calibration=calibration)
        ann = ann or AnnConfig()
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        info = {
            "fsclip_version": __version__, "model_spec": _spec_of(backend.spec), "backend": backend.name,
            "fingerprint": backend.fingerprint, "dim": backend.embed_dim, "runtime": backend.runtime,
            "has_text": int(backend.has_text),
            "generation": 0, "kind": "flat",
            "count": 0, "ann": json.dumps(asdict(ann)), "created": now, "updated": now,
            "index_id": uuid.uuid4().hex,
        }
        with atomic_dir(path, overwrite=True) as tmp:
            info["faiss_checksum"] = fi.write_index(fi.new_flat(backend.embed_dim), tmp / faiss_name(0))
            con = sqlite3.connect(tmp / store.DB_NAME, isolation_level=None)
            try:
                store.create_schema(con, info)
            finally:
                con.close()
        logger.info("created index %s for model %s", path, backend.spec)
        return cls.open(path, backend, device=device, dtype=dtype, runtime=runtime)

    @classmethod
    def open(cls, path: str | os.PathLike, model: Backend | str | None = None, *,
             device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
             runtime: str = "torch") -> ImageIndex:
        """Open an existing index. Without `model`, the index's own model loads when a query needs it.

        `runtime` runs the model (see `fsclip.runtime`); any runtime of the index's weights can query
        and extend it, whichever one built it.
        """
        path = Path(path)
        recover_dir(path)
        if not path.is_dir():
            raise IndexError_(f"no index at {path}; build one with `fsclip index build PHOTOS --index {path}`")
        index = cls(path, None, device, dtype, runtime)
        if model is not None:
            backend = model if isinstance(model, Backend) else index._load(model)
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
    def _info(self):
        return self._snap.info

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
        return self._snap.generation

    @property
    def kind(self) -> str:
        return self._snap.kind

    def __len__(self) -> int:
        return self._snap.count

    @property
    def backend(self) -> Backend:
        """The index's model, loaded on first use and checked against the recorded fingerprint."""
        with self._model_lock:
            if self._backend is None:
                backend = self._load(self.model_spec)
                self._check_model(backend)
                self._backend = backend
            return self._backend

    def _load(self, spec: str) -> Backend:
        # an ONNX runtime not gated yet is gated on the first images under the index's roots
        return load_model(spec, device=self._device, dtype=self._dtype, runtime=self._runtime,
                          calibration=self.roots())

    def _check_model(self, backend: Backend) -> None:
        if backend.embed_dim != self.dim or not backend.matches_fingerprint(self.fingerprint):
            raise IndexError_(
                f"index {self.path} was built with model {self.model_spec!r} (dim {self.dim}, fingerprint "
                f"{self.fingerprint}); model {backend.spec!r} (dim {backend.embed_dim}, fingerprint "
                f"{backend.fingerprint}) cannot query it: use the index's model (omit --model) or rebuild"
            )

    # -- state
    def _con(self, folder: tuple[int, int] | None = None) -> sqlite3.Connection:
        """This thread's connection to the index folder `folder` (default: the current snapshot's)."""
        folder = folder or self._snap.folder
        local = self._local
        if getattr(local, "folder", None) != folder:
            old = getattr(local, "con", None)
            if old is not None:  # the folder was replaced: this thread's old connection is done
                old.close()
                self._cons.remove(old)
            local.con, local.folder = None, None
            con = store.connect(self.path)
            if _snapshot.folder_id(self.path) != folder:
                con.close()
                raise IndexChangedError(f"index {self.path} was replaced while it was being read; retry")
            self._cons.append(con)
            local.con, local.folder = con, folder
        return local.con

    def snapshot(self) -> Snapshot:
        """The latest published state (refreshed first): pass it to several reads to answer from one state."""
        self.refresh()
        return self._snap

    def refresh(self) -> bool:
        """Pick up a newer published generation, or the new index after the folder was replaced.

        Returns True when the state changed. A replacement built for another model raises
        `IndexChangedError` (a reader holding this model cannot query it); nothing of the old index is
        served after its folder is gone.
        """
        with self._lock:
            current = self._snap
            for _ in range(5):
                folder = _snapshot.folder_id(self.path)
                try:
                    con = self._con(folder)
                except IndexChangedError:
                    continue
                info = store.read_info(con, self.path)
                gen = int(info["generation"])
                if current is not None and current.folder == folder and current.generation == gen:
                    return False
                if current is not None and folder != current.folder:
                    self._check_replacement(info)
                try:
                    index, damage = _snapshot.read_published(self.path, con, info), None
                except _snapshot.Republished:
                    continue
                except _snapshot.Damaged as e:  # searches raise it; info shows it; update repairs it
                    index, damage = None, str(e)
                self._snap = Snapshot(gen, MappingProxyType(info), index, folder, damage)
                return True
            raise IndexError_(f"index {self.path} changed repeatedly while opening; try again")

    def _check_replacement(self, info: dict[str, str]) -> None:
        old = self._snap.info
        if (info["dim"], info["fingerprint"]) != (old["dim"], old["fingerprint"]):
            raise IndexChangedError(
                f"index {self.path} was replaced by an index for model {info['model_spec']!r}; this process "
                f"holds model {old['model_spec']!r}: restart it to use the new index")
        logger.warning("index %s was replaced (index id %s -> %s); reading the new one", self.path,
                       old.get("index_id"), info.get("index_id"))

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

        _check_run_options(batch_size, num_workers)
        roots = [normpath(p) for p in _as_list(paths)]
        if not roots:
            raise UsageError("no paths given to add")
        for root in roots:
            check_root(root)
        return sync(self, roots, register=True, batch_size=batch_size, num_workers=num_workers, progress=progress)

    def update(self, *, batch_size: int = 32, num_workers: int | None = None, progress: bool = False):
        """Re-scan every root: embed new and changed files, drop deleted ones, reuse vectors of moved ones."""
        from fsclip.search.update import sync

        _check_run_options(batch_size, num_workers)
        return sync(self, None, register=False, batch_size=batch_size, num_workers=num_workers, progress=progress)

    def remove(self, paths: Sequence[str | os.PathLike]) -> int:
        """Remove files, or everything under folders; they stay out on later updates. Returns the count."""
        from fsclip.search.update import remove

        return remove(self, [normpath(p) for p in _as_list(paths)])

    # -- reading
    def roots(self) -> list[str]:
        return [store.fs_path(r[0]) for r in self._con().execute("SELECT path FROM roots ORDER BY path")]

    def errors(self) -> list[dict]:
        """Bad files skipped by builds, and folders that could not be read: `{"path", "reason"}`."""
        return [dict(path=store.fs_path(r["path"]), reason=r["reason"])
                for r in self._con().execute("SELECT path, reason FROM errors ORDER BY path")]

    def lookup(self, path: str | os.PathLike, snapshot: Snapshot | None = None) -> SearchHit | None:
        """The indexed entry stored under exactly `path` (score 1.0), or None. Never touches the disk."""
        snap = snapshot or self._snap
        row = self._con(snap.folder).execute(
            f"SELECT * FROM files WHERE path = :path AND {store.VISIBLE}",
            {"path": store.db_path(path), "gen": snap.generation},
        ).fetchone()
        return None if row is None else _hit(row, 1.0)

    def identity(self, hit: SearchHit, snapshot: Snapshot | None = None) -> FileIdentity:
        """What was indexed as `hit`: (dev, inode, size, mtime_ns) of the file that was embedded."""
        snap = snapshot or self._snap
        row = self._con(snap.folder).execute("SELECT dev, ino, size, mtime_ns FROM files WHERE id = ?",
                                             (hit.id,)).fetchone()
        if row is None:
            raise IndexChangedError(f"index {self.path} changed while it was being read; retry")
        return FileIdentity(*row)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All visible `(ids (N,), vectors (N, D))`, in id order."""
        snap = self._snap
        parts = list(store.iter_vectors(self._con(snap.folder), store.VISIBLE, {"gen": snap.generation}, self.dim))
        if not parts:
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def info(self) -> dict:
        snap = self.snapshot()
        con = self._con(snap.folder)
        info = snap.info
        pending = con.execute("SELECT count(*) FROM files WHERE added_gen > ? AND removed_gen IS NULL",
                              (snap.generation,)).fetchone()[0]
        n_err = con.execute("SELECT count(*) FROM errors").fetchone()[0]
        kind = snap.kind
        index = {"kind": kind}
        if kind == "ivf":
            index.update(nlist=int(info.get("nlist", 0)), nprobe=int(info.get("nprobe", 0)),
                         tuned_recall_at_10=float(info.get("tuned_recall", "nan")))
        return {
            "path": str(self.path), "images": snap.count, "bad_files": n_err, "model": self.model_spec,
            "has_text": self.has_text,
            "backend": info.get("backend"), "runtime": info.get("runtime", "torch"), "fingerprint": self.fingerprint,
            "dim": self.dim, "index": index,
            "generation": snap.generation, "pending": pending, "roots": self.roots(),
            "excluded": [store.fs_path(r[0]) for r in con.execute("SELECT path FROM excludes ORDER BY path")],
            "ann_threshold": self.ann.ann_threshold, "schema_version": int(info["schema_version"]),
            "fsclip_version": info.get("fsclip_version"), "created": info.get("created"),
            "updated": info.get("updated"), "index_id": snap.index_id, "damaged": snap.damage,
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

    def encode_image(self, image: ImageQuery, snapshot: Snapshot | None = None) -> np.ndarray:
        """One image -> (D,). An indexed path reuses its stored vector; anything else is encoded."""
        if not isinstance(image, Image.Image):
            snap = snapshot or self._snap
            path = normpath(image)
            hit = self.lookup(path, snap)
            if hit is not None:
                return store.vectors_for(self._con(snap.folder), [hit.id], self.dim)[0]
            try:
                image = load_image(path)
            except ImageLoadError as e:
                raise DataError(f"cannot use query image {display_path(image)}: {e}") from None
        backend = self.backend
        with self._model_lock:
            pixels = backend.preprocess(image)[None]  # (1, 3, H, W)
            return backend.encode_images(pixels)[0].cpu().numpy()

    def search(self, text: str | Sequence[str] | None = None, image: ImageQuery | Sequence[ImageQuery] | None = None,
               *, negative_text: str | Sequence[str] | None = None,
               negative_image: ImageQuery | Sequence[ImageQuery] | None = None, negative_weight: float = 0.5,
               k: int = 10, where: Where | dict | None = None, snapshot: Snapshot | None = None) -> list[SearchHit]:
        """Top-k images for the combined query: mean of the positives minus `negative_weight` x mean of the negatives.

        Args:
            text: one or more positive text queries.
            image: one or more positive example images: indexed paths (their stored vector is used),
                other files, or PIL images.
            negative_text, negative_image: what results should be unlike.
            negative_weight: weight of the negatives' mean similarity in the score.
            k: number of results.
            where: metadata filter (`Where` or a dict of its fields).
            snapshot: answer from this state (default: the latest).
        """
        _check_k(k)
        where = Where.from_dict(where)
        snap = snapshot or self.snapshot()
        pos = [*self._text_rows(text), *(self.encode_image(x, snap) for x in _as_list(image))]
        neg = [*self._text_rows(negative_text), *(self.encode_image(x, snap) for x in _as_list(negative_image))]
        query = combine_queries(torch.from_numpy(np.stack(pos)) if pos else torch.empty(0, self.dim),
                                torch.from_numpy(np.stack(neg)) if neg else None, negative_weight)
        return self.search_vectors(query.numpy()[None], k=k, where=where, snapshot=snap)[0]

    def _text_rows(self, text) -> list[np.ndarray]:
        texts = _as_list(text)
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise UsageError("text queries must be non-empty strings")
        return list(self.encode_text(texts)) if texts else []

    def search_vectors(self, queries: np.ndarray, k: int = 10, where: Where | dict | None = None,
                       snapshot: Snapshot | None = None) -> list[list[SearchHit]]:
        """(B, D) query vectors -> B ranked hit lists (fewer than k when the filter or index is small)."""
        _check_k(k)
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise UsageError(f"query vectors must have shape (B, {self.dim}), got {tuple(queries.shape)}")
        where = Where.from_dict(where)
        snap = snapshot or self.snapshot()
        index, gen, con = snap.searchable(), snap.generation, self._con(snap.folder)
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


class FileIdentity(NamedTuple):
    """The file an entry was embedded from; `dev`/`ino` are None for entries of a schema-1 index."""

    dev: int | None
    ino: int | None
    size: int
    mtime_ns: int


def _check_run_options(batch_size, num_workers) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 1):
        raise UsageError(f"num_workers must be a positive integer or None, got {num_workers!r}")


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
        raise UsageError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")


def _hit(row, score: float) -> SearchHit:
    return SearchHit(path=store.fs_path(row["path"]), score=score, id=int(row["id"]), width=row["width"],
                     height=row["height"], size=int(row["size"]), mtime=row["mtime_ns"] / 1e9)
