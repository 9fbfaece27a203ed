"""`ImageIndex`: an image collection's vectors and metadata in a store, searched by text or example.

The location picks the store (`fsclip.search.stores`): a folder is the FAISS store (the default),
`PATH.db` embedded Milvus Lite, `milvus://HOST:PORT/COLLECTION` a Milvus server. The index records
its model (spec, weights fingerprint, dim, runtime) when it is created, so opening it needs nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from fsclip._paths import display_path
from fsclip._version import __version__
from fsclip.backends import Backend, load_model
from fsclip.backends.base import no_text_tower
from fsclip.backends.registry import BUNDLED
from fsclip.errors import DataError, IndexError_, UsageError
from fsclip.images import ImageLoadError, load_image
from fsclip.search import catalog, stores
from fsclip.search._scan import check_root, normpath
from fsclip.search.faiss_index import AnnConfig
from fsclip.search.query import Where, combine_queries
from fsclip.search.stores import Entry, IndexChangedError, Snapshot, Store

__all__ = ["FileIdentity", "ImageIndex", "IndexChangedError", "SearchHit", "Snapshot"]

logger = logging.getLogger(__name__)

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


class ImageIndex:
    """A searchable image collection. Create with `create`, open with `open`.

    Readers see the published generation only; `add`, `update` and `remove` stage their changes and
    publish them at the end, so a concurrent reader sees the old state or the new one, never a mix.
    Each read works on one `Snapshot` (see `snapshot()`); pass the same one to several calls (as the
    web service does per request) to answer them all from one state.
    """

    def __init__(self, store: Store, backend: Backend | None, device: str | torch.device,
                 dtype: str | torch.dtype | None, runtime: str = "torch"):
        self.store = store
        self.location = store.location
        self.path = Path(store.location) if "://" not in store.location else None  # local indexes only
        self._backend = backend
        self._device, self._dtype, self._runtime = device, dtype, runtime
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._snap: Snapshot | None = None
        self.refresh()

    # -- opening
    @classmethod
    def create(cls, path: str | os.PathLike, model: Backend | str | Mapping, *, ann: AnnConfig | None = None,
               overwrite: bool = False, device: str | torch.device = "auto",
               dtype: str | torch.dtype | None = None, runtime: str = "torch",
               calibration: Sequence | None = None) -> ImageIndex:
        """Create an empty index for `model` at `path` (a folder, `X.db` or `milvus://...`). Atomic for a folder.

        `model` is a loaded backend, a spec, or the model record of an `fsclip embed` manifest (spec,
        backend, fingerprint, dim, runtime: nothing is loaded then). `runtime` (see `fsclip.runtime`) runs
        the model when `model` is a spec, and later queries; an ONNX runtime used for the first time is
        gated on the first images of `calibration` (e.g. the folders about to be added).
        """
        location = os.fspath(path)
        engine = stores.engine_for(location)
        if isinstance(model, Mapping):
            record = {k: model[k] for k in ("spec", "backend", "fingerprint", "dim")}
            record["runtime"] = model.get("runtime", "torch")
            record["has_text"] = model.get("has_text", True)  # manifests from before the key: CLIP models
            backend = None
        else:
            backend = model if isinstance(model, Backend) else load_model(model, device=device, dtype=dtype,
                                                                          runtime=runtime, calibration=calibration)
            record = {"spec": backend.spec, "backend": backend.name, "fingerprint": backend.fingerprint,
                      "dim": backend.embed_dim, "runtime": backend.runtime, "has_text": backend.has_text}
        ann = ann or AnnConfig()
        _check_budget(engine, ann.max_memory)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        info = {
            "fsclip_version": __version__, "model_spec": _spec_of(record["spec"]), "backend": record["backend"],
            "fingerprint": record["fingerprint"], "dim": int(record["dim"]), "runtime": record["runtime"],
            "has_text": int(record["has_text"]),
            "generation": 0, "kind": "flat",
            "count": 0, "ann": json.dumps(asdict(ann)), "created": now, "updated": now,
            "index_id": uuid.uuid4().hex,
        }
        store = engine.create(location, {k: str(v) for k, v in info.items()}, overwrite=overwrite)
        logger.info("created index %s (%s) for model %s", location, engine.engine, record["spec"])
        return cls(store, backend, device, dtype, runtime)

    @classmethod
    def open(cls, path: str | os.PathLike, model: Backend | str | None = None, *,
             device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
             runtime: str = "torch") -> ImageIndex:
        """Open an existing index. Without `model`, the index's own model loads when a query needs it.

        `runtime` runs the model (see `fsclip.runtime`); any runtime of the index's weights can query
        and extend it, whichever one built it.
        """
        index = cls(stores.open_store(os.fspath(path)), None, device, dtype, runtime)
        if model is not None:
            backend = model if isinstance(model, Backend) else index._load(model)
            index._check_model(backend)
            index._backend = backend
        return index

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        """Whether an index (or something in its way) is at `path`."""
        location = os.fspath(path)
        return stores.engine_for(location).exists(location)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what it is
    @property
    def _info(self):
        return self._snap.info

    @property
    def engine(self) -> str:
        return self.store.engine

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
                f"index {self.location} was built with model {self.model_spec!r} (dim {self.dim}, fingerprint "
                f"{self.fingerprint}); model {backend.spec!r} (dim {backend.embed_dim}, fingerprint "
                f"{backend.fingerprint}) cannot query it: use the index's model (omit --model) or rebuild"
            )

    # -- state
    def snapshot(self) -> Snapshot:
        """The latest published state (refreshed first): pass it to several reads to answer from one state."""
        self.refresh()
        return self._snap

    def refresh(self) -> bool:
        """Pick up a newer published generation, or the new index after it was replaced.

        Returns True when the state changed. A replacement built for another model raises
        `IndexChangedError` (a reader holding this model cannot query it); nothing of the old index is
        served after it is gone.
        """
        with self._lock:
            current = self._snap
            snap = self.store.snapshot(current)
            if snap is current:
                return False
            if current is not None and snap.token != current.token:
                self._check_replacement(snap.info)
            self._snap = snap
            return True

    def _check_replacement(self, info: Mapping[str, str]) -> None:
        old = self._snap.info
        if (info["dim"], info["fingerprint"]) != (old["dim"], old["fingerprint"]):
            raise IndexChangedError(
                f"index {self.location} was replaced by an index for model {info['model_spec']!r}; this process "
                f"holds model {old['model_spec']!r}: restart it to use the new index")
        logger.warning("index %s was replaced (index id %s -> %s); reading the new one", self.location,
                       old.get("index_id"), info.get("index_id"))

    @contextlib.contextmanager
    def _writer(self) -> Iterator:
        """The write lock (one updater per index; released by the OS if the process dies) and the catalog."""
        with self.store.writer() as con:
            yield con
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

    def load_embeddings(self, folder: str | os.PathLike, *, paths: Sequence[str | os.PathLike] = (),
                        batch_size: int = 32, num_workers: int | None = None, progress: bool = False):
        """Add the rows of an `fsclip embed` output folder without re-encoding (see `update.load_embeddings`),
        then, with `paths`, `add` those folders: what the shards hold is not embedded again, the rest is,
        and the folders are served and kept up to date like any others."""
        from fsclip.search.update import combine, load_embeddings

        roots = [normpath(p) for p in _as_list(paths)]
        for root in roots:
            check_root(root)
        report = load_embeddings(self, os.fspath(folder), under=roots, progress=progress)
        if roots:
            report = combine(report, self.add(roots, batch_size=batch_size, num_workers=num_workers,
                                              progress=progress))
        return report

    def set_max_memory(self, max_memory: int | None) -> None:
        """Change the memory budget of the searchable index (None: no limit); the next `update` rebuilds
        the index if it no longer fits, or if a more accurate one now does."""
        from fsclip.search.update import set_ann

        _check_budget(type(self.store), max_memory)
        set_ann(self, dataclasses.replace(self.ann, max_memory=max_memory))

    def remove(self, paths: Sequence[str | os.PathLike]) -> int:
        """Remove files, or everything under folders; they stay out on later updates. Returns the count."""
        from fsclip.search.update import remove

        return remove(self, [normpath(p) for p in _as_list(paths)])

    # -- reading
    def roots(self) -> list[str]:
        return self.store.roots(self._snap)

    def errors(self) -> list[dict]:
        """Bad files skipped by builds, and folders that could not be read: `{"path", "reason"}`."""
        con = self.store.catalog(self._snap)
        if con is None:
            return []
        return [dict(path=catalog.fs_path(r["path"]), reason=r["reason"])
                for r in con.execute("SELECT path, reason FROM errors ORDER BY path")]

    def lookup(self, path: str | os.PathLike, snapshot: Snapshot | None = None) -> SearchHit | None:
        """The indexed entry stored under exactly `path` (score 1.0), or None. Never touches the disk."""
        entry = self.store.lookup(snapshot or self._snap, os.fspath(path))
        return None if entry is None else _hit(entry, 1.0)

    def identity(self, hit: SearchHit, snapshot: Snapshot | None = None) -> FileIdentity:
        """What was indexed as `hit`: (dev, inode, size, mtime_ns) of the file that was embedded."""
        entry = self.store.entry(snapshot or self._snap, hit.id)
        if entry is None:
            raise IndexChangedError(f"index {self.location} changed while it was being read; retry")
        return FileIdentity(entry.dev, entry.ino, entry.size, entry.mtime_ns)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All visible `(ids (N,), vectors (N, D))`, in id order."""
        parts = list(self.store.iter_vectors(self._snap))
        if not parts:
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        ids, vecs = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        order = np.argsort(ids, kind="stable")
        return ids[order], vecs[order]

    def info(self) -> dict:
        snap = self.snapshot()
        info = snap.info
        con = self.store.catalog(snap)
        pending = n_err = None
        excluded: list[str] = []
        if con is not None:
            pending = con.execute("SELECT count(*) FROM files WHERE added_gen > ? AND removed_gen IS NULL",
                                  (snap.generation,)).fetchone()[0]
            n_err = con.execute("SELECT count(*) FROM errors").fetchone()[0]
            excluded = [catalog.fs_path(r[0]) for r in con.execute("SELECT path FROM excludes ORDER BY path")]
        if n_err is None and "bad_files" in info:
            n_err = int(info["bad_files"])
        return {
            "path": self.location, "images": snap.count, "bad_files": n_err, "model": self.model_spec,
            "has_text": self.has_text,
            "backend": info.get("backend"), "runtime": info.get("runtime", "torch"), "fingerprint": self.fingerprint,
            "dim": self.dim, "index": {"kind": snap.kind},
            "generation": snap.generation, "pending": pending, "roots": self.roots(), "excluded": excluded,
            "ann_threshold": self.ann.ann_threshold, "max_memory": self.ann.max_memory,
            "schema_version": int(info["schema_version"]),
            "fsclip_version": info.get("fsclip_version"), "created": info.get("created"),
            "updated": info.get("updated"), "index_id": snap.index_id, "damaged": snap.damage,
            "disk_bytes": None, **self.store.describe(snap),
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
                return self.store.vectors(snap, np.array([hit.id], np.int64))[0]
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
        snap.searchable()
        return [[_hit(entry, score) for score, entry in hits]
                for hits in self.store.search(snap, queries, int(k), where)]

    def __repr__(self) -> str:
        return (f"ImageIndex({self.location!r}, engine={self.engine!r}, images={len(self)}, "
                f"model={self.model_spec!r}, kind={self.kind!r})")


class FileIdentity(NamedTuple):
    """The file an entry was embedded from; `dev`/`ino` are None for entries of a schema-1 index."""

    dev: int | None
    ino: int | None
    size: int
    mtime_ns: int


def _check_budget(engine: type[Store], max_memory: int | None) -> None:
    if max_memory is not None and not engine.supports_max_memory:
        raise UsageError(f"a memory budget (--max-memory) sizes the FAISS index; a {engine.engine} index keeps "
                         "its memory where the engine runs (choose its index type there)")


def _check_run_options(batch_size, num_workers) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 1):
        raise UsageError(f"num_workers must be a positive integer or None, got {num_workers!r}")


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
        raise UsageError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")


def _hit(entry: Entry, score: float) -> SearchHit:
    return SearchHit(path=entry.path, score=score, id=entry.id, width=entry.width, height=entry.height,
                     size=entry.size, mtime=entry.mtime_ns / 1e9)
