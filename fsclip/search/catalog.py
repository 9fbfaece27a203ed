"""The catalog: an index's SQLite record of files, their vectors, bad files, roots, and the published generation.

Every engine has one (`fsclip.search.stores`): it is what `index build/update/remove` diff the disk
against and where they stage their work. Versioning is what keeps readers consistent while a writer
works. Each file row carries the generation that added it and the one that removed it. A writer stages
rows for generation G+1, committing every batch (so a killed build resumes from its last commit);
readers only see rows visible at the published generation G. The store then publishes G+1 in one step
(for FAISS one transaction here; for Milvus one property write on the collection).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from fsclip.errors import IndexError_

__all__ = ["SCHEMA_VERSION", "connect", "create_schema", "damaged", "db_path", "fs_path", "read_info", "tx",
           "visible", "write_lock"]

# 3: the FAISS store publishes a generation without rewriting its FAISS file (base + delta + tombstones,
# `base_generation` in info). A schema-2 index reads as one whose base is its published generation; its
# next publish marks it 3, so an older fsclip refuses it instead of taking it for a damaged index.
SCHEMA_VERSION = 3
READABLE = (2, 3)
DB_NAME = "meta.sqlite"
LOCK_NAME = "write.lock"

# Paths are stored as the bytes the OS uses (`os.fsencode`), so every file name round-trips, UTF-8 or not.
_SCHEMA = """
CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE roots (path BLOB PRIMARY KEY);
CREATE TABLE excludes (path BLOB PRIMARY KEY);
-- id is the FAISS id; AUTOINCREMENT so an id is never reused while an older reader may still hold it.
-- dev/ino/size/mtime_ns: the identity of the file that was embedded; only that file is ever served.
CREATE TABLE files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path BLOB NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    hash TEXT NOT NULL,
    width INTEGER,
    height INTEGER,
    added_gen INTEGER NOT NULL,
    removed_gen INTEGER,
    dev INTEGER,
    ino INTEGER
);
CREATE UNIQUE INDEX files_live_path ON files (path) WHERE removed_gen IS NULL;
CREATE INDEX files_hash ON files (hash);
CREATE INDEX files_added ON files (added_gen);
CREATE INDEX files_removed ON files (removed_gen);
CREATE TABLE vectors (id INTEGER PRIMARY KEY, vec BLOB NOT NULL);
CREATE TABLE errors (path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, reason TEXT NOT NULL);
"""
_TABLES = ("info", "roots", "excludes", "files", "vectors", "errors")

# Schema 1 stored paths as UTF-8 text (names that were not UTF-8 could not be indexed at all) and no
# file identity. CAST(text AS BLOB) gives exactly the UTF-8 bytes, i.e. `os.fsencode` of those names.
_MIGRATE_1 = """
UPDATE roots SET path = CAST(path AS BLOB);
UPDATE excludes SET path = CAST(path AS BLOB);
UPDATE files SET path = CAST(path AS BLOB);
UPDATE errors SET path = CAST(path AS BLOB);
ALTER TABLE files ADD COLUMN dev INTEGER;
ALTER TABLE files ADD COLUMN ino INTEGER;
"""

# Rows a reader at generation `:gen` sees.
VISIBLE = "added_gen <= :gen AND (removed_gen IS NULL OR removed_gen > :gen)"
_SQL_VARS = 500  # ids per `IN (...)`; well under SQLite's variable limit


def visible(gen: int) -> tuple[str, dict]:
    return VISIBLE, {"gen": gen}


def db_path(path: str | os.PathLike) -> bytes:
    """A path as the index stores it: the OS's bytes."""
    return os.fsencode(path)


def fs_path(value: bytes | str) -> str:
    """A stored path back as `str` (undecodable bytes kept as surrogates, so `open()` finds the file)."""
    return os.fsdecode(value)


def damaged(path: str | os.PathLike, what: str, fix: str | None = None) -> IndexError_:
    """The error for an index whose files do not fit together; `fix` says how to recover."""
    fix = fix or f"rebuild it with `fsclip index build PHOTOS --index {path} --overwrite`"
    return IndexError_(f"index damaged: {what}; {fix}")


def connect(path: Path, write: bool = False) -> sqlite3.Connection:
    """Open the metadata database; WAL lets readers keep their snapshot while a writer commits.

    Checks that every table is there and upgrades an index of the previous schema in place.
    """
    db = Path(path) / DB_NAME
    if not db.is_file():
        raise IndexError_(f"{path} is not an fsclip index (no {DB_NAME}); build one with `fsclip index build`")
    try:
        con = sqlite3.connect(db, timeout=30, check_same_thread=False, isolation_level=None)
        con.execute("PRAGMA busy_timeout = 30000")
        if write:
            # FULL: a commit survives power loss too, so a published generation never points at a
            # FAISS file that the disk forgot.
            con.execute("PRAGMA synchronous = FULL")
        con.execute("PRAGMA foreign_keys = OFF")
        con.row_factory = sqlite3.Row
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        raise IndexError_(f"cannot open index {path}: {e}") from None
    lacking = [t for t in _TABLES if t not in tables]
    if lacking:
        con.close()
        raise damaged(path, f"{DB_NAME} has no table {lacking[0]!r}")
    try:
        _upgrade(con, path)
    except BaseException:
        con.close()
        raise
    return con


class Connections:
    """One catalog connection per thread, reopened when the catalog file is replaced; `close` ends them all."""

    def __init__(self):
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def get(self, key, folder: Path, check=None) -> sqlite3.Connection:
        """This thread's connection for `key` (the catalog's identity); `check()` runs after a reconnect."""
        local = self._local
        if getattr(local, "key", None) != key:
            old = getattr(local, "con", None)
            if old is not None:  # the catalog was replaced: this thread's old connection is done
                old.close()
                with self._lock:
                    self._all.remove(old)
            local.con, local.key = None, None
            con = connect(folder)
            try:
                if check is not None:
                    check()
            except BaseException:
                con.close()
                raise
            with self._lock:
                self._all.append(con)
            local.con, local.key = con, key
        return local.con

    def close(self) -> None:
        with self._lock:
            for con in self._all:
                con.close()
            self._all.clear()
        self._local = threading.local()


def _upgrade(con: sqlite3.Connection, path: Path) -> None:
    """Schema 1 -> 2 (paths as bytes, file identity). 2 -> 3 needs no change of data (see SCHEMA_VERSION)."""
    if _version(con) != 1:
        return
    try:
        con.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
        raise IndexError_(f"index {path} needs a one-time upgrade to schema 2 but cannot be "
                          f"written ({e}); open it once where it is writable") from None
    try:  # statement by statement: executescript would commit half of it
        if _version(con) == 1:  # another process may have upgraded it meanwhile
            for statement in filter(str.strip, _MIGRATE_1.split(";")):
                con.execute(statement)
            set_info(con, schema_version=2, index_id=uuid.uuid4().hex)
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _version(con: sqlite3.Connection) -> int:
    row = con.execute("SELECT value FROM info WHERE key = 'schema_version'").fetchone()
    try:
        return int(row[0]) if row is not None else 0
    except ValueError:
        return 0


def create_schema(con: sqlite3.Connection, info: dict[str, str]) -> None:
    con.execute("PRAGMA journal_mode = WAL")
    con.executescript(_SCHEMA)
    con.executemany("INSERT INTO info (key, value) VALUES (?, ?)",
                    [("schema_version", str(SCHEMA_VERSION)), *((k, str(v)) for k, v in info.items())])


_INT_KEYS = {"generation": 0, "dim": 1, "count": 0}  # key -> smallest valid value
_OPTIONAL_INT = ("base_generation", "base_count")  # FAISS store, schema 3


def read_info(con: sqlite3.Connection, path: str | os.PathLike = "") -> dict[str, str]:
    """The info table, checked: a value that cannot be right is reported as damage, not a traceback."""
    try:
        info = {r["key"]: r["value"] for r in con.execute("SELECT key, value FROM info")}
    except sqlite3.DatabaseError as e:
        raise damaged(path, f"cannot read {DB_NAME}: {e}") from None
    version = int(info["schema_version"]) if info.get("schema_version", "").isdigit() else 0
    if version not in READABLE:
        raise IndexError_(
            f"index schema version {info.get('schema_version')} is not supported by this fsclip (it reads "
            f"version {SCHEMA_VERSION}); rebuild the index with `fsclip index build --overwrite`"
        )
    for key in ("model_spec", "fingerprint", "ann", *_INT_KEYS):
        if key not in info:
            raise damaged(path, f"{DB_NAME} has no {key!r} entry")
    for key, low in (*_INT_KEYS.items(), *((k, 0) for k in _OPTIONAL_INT if k in info)):
        try:
            ok = int(info[key]) >= low
        except ValueError:
            ok = False
        if not ok:
            raise damaged(path, f"{DB_NAME} records {key} = {info[key]!r}, not an integer >= {low}")
    return info


@contextlib.contextmanager
def tx(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (taken at once: a second writer waits on the lock, not halfway through)."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


@contextlib.contextmanager
def write_lock(folder: Path, name: str) -> Iterator[None]:
    """The one-writer lock of an index (flock; released by the OS if the process dies)."""
    fd = os.open(Path(folder) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexError_(f"{name} is being updated by another process; wait for it to finish") from None
        yield
    finally:
        os.close(fd)


def set_info(con: sqlite3.Connection, **values) -> None:
    con.executemany("INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)",
                    [(k, str(v)) for k, v in values.items()])


def to_blob(vec: np.ndarray) -> bytes:
    return np.ascontiguousarray(vec, dtype="<f4").tobytes()


def from_blobs(blobs: list[bytes], dim: int) -> np.ndarray:
    """Blobs -> (N, dim) float32."""
    if not blobs:
        return np.empty((0, dim), np.float32)
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim).astype(np.float32)


def chunked(seq: list, size: int = _SQL_VARS) -> Iterator[list]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def vectors_for(con: sqlite3.Connection, ids: Iterable[int], dim: int) -> np.ndarray:
    """Vectors of `ids`, in the order given: (len(ids), dim)."""
    ids = [int(i) for i in ids]
    found: dict[int, bytes] = {}
    for part in chunked(ids):
        q = f"SELECT id, vec FROM vectors WHERE id IN ({','.join('?' * len(part))})"
        found.update((r[0], r[1]) for r in con.execute(q, part))
    missing = [i for i in ids if i not in found]
    if missing:
        raise IndexError_(f"index is inconsistent: no stored vector for id {missing[0]}")
    return from_blobs([found[i] for i in ids], dim)


def vectors_found(con: sqlite3.Connection, ids: Iterable[int], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """`(found ids, their vectors)` of those of `ids` still stored (a reader's old state may name rows
    that a writer has since forgotten)."""
    found_ids: list[int] = []
    blobs: list[bytes] = []
    for part in chunked([int(i) for i in ids]):
        q = f"SELECT id, vec FROM vectors WHERE id IN ({','.join('?' * len(part))})"
        for r in con.execute(q, part):
            found_ids.append(r[0])
            blobs.append(r[1])
    return np.array(found_ids, np.int64), from_blobs(blobs, dim)


def rows_for(con: sqlite3.Connection, ids: Iterable[int]) -> dict[int, sqlite3.Row]:
    out: dict[int, sqlite3.Row] = {}
    for part in chunked([int(i) for i in ids]):
        q = f"SELECT * FROM files WHERE id IN ({','.join('?' * len(part))})"
        out.update((r["id"], r) for r in con.execute(q, part))
    return out


def iter_vectors(con: sqlite3.Connection, where: str, params: dict, dim: int,
                 chunk: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream `(ids (n,), vectors (n, dim))` of the file rows matching `where`, in id order.

    Keyset pagination keeps memory at one chunk and never holds a read cursor across a write.
    """
    last = -1
    while True:
        q = (f"SELECT f.id, v.vec FROM files f JOIN vectors v ON v.id = f.id "
             f"WHERE f.id > :last AND ({where}) ORDER BY f.id LIMIT {int(chunk)}")
        rows = con.execute(q, {**params, "last": last}).fetchall()
        if not rows:
            return
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        yield ids, from_blobs([r[1] for r in rows], dim)
        last = int(ids[-1])


def ids_where(con: sqlite3.Connection, where: str, params: dict) -> np.ndarray:
    rows = con.execute(f"SELECT id FROM files WHERE {where} ORDER BY id", params)
    return np.fromiter((r[0] for r in rows), dtype=np.int64)
