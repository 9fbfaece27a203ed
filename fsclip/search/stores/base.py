"""The vector-store interface: what `ImageIndex` searches, and how a generation becomes searchable.

An index has two parts:

* the catalog (`fsclip.search.catalog`, SQLite): the writer's record of every file (path bytes, size,
  mtime_ns, device/inode, content hash, pixel size), versioned by generation, with roots, exclusions
  and bad files. `index build/update/remove` diff the disk against it and stage their work there in
  committed batches, so a run killed at any point resumes. It is the same for every engine.
* the store (this interface): what readers search. `publish` makes the catalog's staged generation
  searchable in one atomic step; `snapshot` reads the latest published generation; searches, lookups
  and vectors are answered from one snapshot, so a request never mixes two generations.

Engines, chosen from the index location by `open_store` / `create_store`:

* `faiss` (a folder, the default): the catalog and the FAISS files side by side; the catalog also
  holds the vectors and answers filters and lookups.
* `milvus` (`PATH.db`: embedded Milvus Lite; `milvus://HOST:PORT/COLLECTION`: a Milvus server or
  cluster): each row carries the file's metadata as scalar fields, so any process that reaches the
  collection can search, filter and serve without the writer's catalog.

Filters (`Where`) and the scores (inner products) mean the same on every engine; positive/negative
query combination happens above the store (`ImageIndex.search`), so it is the same too.
"""

from __future__ import annotations

import contextlib
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from fsclip.errors import IndexError_
from fsclip.search import catalog as _catalog
from fsclip.search.faiss_index import AnnConfig
from fsclip.search.query import Where

__all__ = ["Entry", "IndexChangedError", "Snapshot", "Store", "create_store", "engine_for", "list_engines",
           "open_store", "register_store"]


class IndexChangedError(IndexError_):
    """The index was replaced under a running reader in a way it cannot follow (another model)."""


class Entry(NamedTuple):
    """One indexed file as a store returns it. `dev`/`ino` are None where unknown (loaded embeddings)."""

    id: int
    path: str  # as `os.fsdecode` gives it: undecodable bytes kept as surrogates
    size: int
    mtime_ns: int
    width: int | None
    height: int | None
    dev: int | None
    ino: int | None


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of one published generation of one index.

    Attributes:
        generation: the published generation.
        info: the index's info as published with it (model, fingerprint, dim, counts; strings).
        count: searchable images.
        kind: the search structure (flat, ivf, ivf-sq8, ivf-pq).
        token: which physical index this was read from (a folder's device/inode, a collection's index
            id); another value means the index was replaced (e.g. `index build --overwrite`).
        damage: why the index cannot be searched, or None.
        state: the engine's own data (FAISS: base index, delta, tombstones).
    """

    generation: int
    info: Mapping[str, str]
    count: int
    kind: str
    token: Hashable
    damage: str | None = None
    state: Any = None

    @property
    def index_id(self) -> str | None:
        return self.info.get("index_id")

    def searchable(self) -> Any:
        if self.damage is not None:
            raise IndexError_(self.damage)
        return self.state


# Tuning text queries, embedded by the index's model; None when the model cannot be loaded.
TextQueries = Callable[[], "np.ndarray | None"]


class Store(ABC):
    """Where an index's vectors are searched. One instance per open index; reads are thread-safe."""

    engine: ClassVar[str]
    default: ClassVar[bool] = False  # asked last: takes any location no other engine claims
    supports_max_memory: ClassVar[bool] = False  # honours `AnnConfig.max_memory`
    location: str  # as shown to the user and stored nowhere else
    catalog_dir: Any  # folder of the catalog (meta.sqlite, write.lock); a Path

    # -- finding and creating
    @classmethod
    @abstractmethod
    def claims(cls, location: str) -> bool:
        """Whether `location` names an index of this engine."""

    @classmethod
    @abstractmethod
    def exists(cls, location: str) -> bool:
        """Whether an index (or something in its way) is at `location`."""

    @classmethod
    @abstractmethod
    def create(cls, location: str, info: dict[str, str], *, overwrite: bool) -> Store:
        """A new, empty index at `location` holding `info` (model, fingerprint, dim, ...)."""

    @classmethod
    @abstractmethod
    def open(cls, location: str) -> Store:
        """The existing index at `location`; `IndexError_` with what to do when there is none."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""

    # -- reading one published generation
    @abstractmethod
    def snapshot(self, current: Snapshot | None = None) -> Snapshot:
        """The latest published generation; `current` itself when nothing changed (cheap)."""

    @abstractmethod
    def search(self, snap: Snapshot, queries: np.ndarray, k: int,
               where: Where | None) -> list[list[tuple[float, Entry]]]:
        """(B, D) query vectors -> B lists of (inner product, entry), best first, at most k each."""

    @abstractmethod
    def lookup(self, snap: Snapshot, path: str) -> Entry | None:
        """The entry stored under exactly `path` (no normalisation), or None."""

    @abstractmethod
    def entry(self, snap: Snapshot, id: int) -> Entry | None:
        """The entry with this id if any generation from `snap`'s on still holds it."""

    @abstractmethod
    def vectors(self, snap: Snapshot, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of `ids`, in that order: (len(ids), D)."""

    @abstractmethod
    def iter_vectors(self, snap: Snapshot, chunk: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every searchable `(ids (n,), vectors (n, D))`, in chunks."""

    @abstractmethod
    def roots(self, snap: Snapshot) -> list[str]:
        """The indexed folders (a file is served only from under one of them)."""

    def describe(self, snap: Snapshot) -> dict:
        """Engine-specific fields for `ImageIndex.info()`."""
        return {"engine": self.engine, "location": self.location}

    # -- writing (the caller holds the write lock: `writer`)
    def catalog(self, snap: Snapshot | None = None) -> sqlite3.Connection | None:
        """This thread's connection to the catalog; None where this process has none (a Milvus reader)."""
        return None

    @contextlib.contextmanager
    def writer(self) -> Iterator[sqlite3.Connection]:
        """The write lock (one updater per index; released by the OS if the process dies) and a
        connection to the catalog."""
        with _catalog.write_lock(self.catalog_dir, self.location):
            con = _catalog.connect(self.catalog_dir, write=True)
            try:
                yield con
            finally:
                con.close()

    @abstractmethod
    def begin(self, con: sqlite3.Connection) -> int:
        """Start a write: settle what an interrupted one left, forget rows no reader can see. Returns
        the published generation."""

    @abstractmethod
    def publish(self, con: sqlite3.Connection, gen: int, new: int, *, ann: AnnConfig,
                text_queries: TextQueries, progress: bool = False) -> tuple[str, int]:
        """Make the catalog's rows visible at `new` the searchable state, atomically. With nothing staged
        the published generation stays (unless it needs repair). Returns (kind, count)."""

    @abstractmethod
    def stored_vector(self, con: sqlite3.Connection, id: int) -> np.ndarray | None:
        """The vector of a catalog row (a published one may live only in the store), or None."""


_ENGINES: list[type[Store]] = []


def register_store(cls: type[Store]) -> type[Store]:
    """Add an engine. `engine_for` asks them in the order registered, the default engine last."""
    if any(e.engine == cls.engine for e in _ENGINES):
        raise ValueError(f"store engine {cls.engine!r} is already registered")
    _ENGINES.append(cls)
    return cls


def list_engines() -> list[str]:
    return [e.engine for e in _ENGINES]


def engine_for(location: str) -> type[Store]:
    for cls in sorted(_ENGINES, key=lambda e: e.default):
        if cls.claims(location):
            return cls
    raise IndexError_(f"no store engine can hold an index at {location!r}; engines: {', '.join(list_engines())}")


def open_store(location: str) -> Store:
    return engine_for(location).open(location)


def create_store(location: str, info: dict[str, str], *, overwrite: bool = False) -> Store:
    return engine_for(location).create(location, info, overwrite=overwrite)
