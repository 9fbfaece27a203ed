"""The Milvus store: an index whose vectors live in a Milvus collection (`pip install 'fsclip[milvus]'`).

Locations:
    PATH.db                           embedded Milvus Lite: the folder PATH.db holds the collection
                                      `fsclip` and, in PATH.db/fsclip/, the catalog
    milvus://HOST:PORT/COLLECTION     a Milvus standalone or distributed server (`?db=NAME` picks a
                                      database; a token, "user:password" or an API key, comes from
                                      $MILVUS_TOKEN); the catalog is kept on the writing machine under
                                      $FSCLIP_DATA (default ~/.local/share/fsclip)/milvus/

Where the file metadata lives, and why: every row carries its file's metadata as scalar fields (path,
size, mtime_ns, device/inode, content hash, width, height), so any process that reaches the collection
(several `fsclip serve` replicas, another machine) can search, filter and check a file's identity before
serving it, without a local file. The catalog (`fsclip.search.catalog`, SQLite) is the writer's journal
only: it diffs the disk against what is indexed and stages a run's work in committed batches, exactly
as for FAISS, so a killed build resumes and loses nothing. It keeps vectors only until they are
published (a 100M-image collection's vectors stay in Milvus, not on the writer's disk). A writer on a
machine without the catalog rebuilds it from the collection first.

Generations: each row has `added_gen` and `removed_gen` (0 while live), and the collection's property
`fsclip` holds the index's info, including the published generation G. Readers filter on the rows
visible at G, so staged rows (added at G+1) stay invisible and rows being removed stay visible until
the property moves to G+1: one property write publishes a generation atomically, and a snapshot
(G) answers the same whatever a writer does meanwhile. Upserts are keyed by the catalog's row id, so
pushing a generation again after a crash is idempotent; rows a killed run pushed but no longer stages
are deleted before publishing. Rows removed before the published generation are deleted at the next
write.

Search: inner product on a FLAT index (exact) below the IVF threshold, IVF_FLAT from it on (the same
rule and hysteresis as the FAISS store), with nprobe tuned to the recall target on stored and text
queries. Path globs and prefixes become a LIKE filter that may match more (LIKE has no character
classes and no escape in Milvus Lite); hits are then checked exactly, fetching more until k pass.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from urllib.parse import parse_qs, urlparse

import numpy as np

from fsclip._io import atomic_dir, recover_dir
from fsclip.errors import IndexError_, UsageError
from fsclip.search import catalog
from fsclip.search import faiss_index as fi
from fsclip.search.catalog import VISIBLE
from fsclip.search.faiss_index import AnnConfig
from fsclip.search.query import Where
from fsclip.search.stores.base import Entry, Snapshot, Store, TextQueries, register_store

__all__ = ["MilvusStore", "parse_location"]

logger = logging.getLogger(__name__)

INSTALL = "pip install 'fsclip[milvus]'"
LITE_COLLECTION = "fsclip"
CATALOG = "fsclip"  # the catalog's folder inside a Milvus Lite PATH.db
PROPERTY = "fsclip"  # the collection property holding the index's info (JSON)
BATCH = 1000  # rows per upsert / get
MAX_PATH = 16_384  # VARCHAR length of a stored path (4,096 bytes escaped \xNN at most)
MAX_LIMIT = 16_384  # Milvus's largest top-k
META = ["path", "path_escaped", "size", "mtime_ns", "width", "height", "dev", "ino"]
RETUNE_FRACTION = 0.05
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


@dataclass(frozen=True)
class Location:
    uri: str  # for MilvusClient: the .db path, or http(s)://HOST:PORT
    collection: str
    db: str | None
    catalog_dir: Path
    lite: bool


def parse_location(location: str) -> Location:
    """`PATH.db` or `milvus[+https]://HOST[:PORT]/COLLECTION[?db=NAME]` -> where to connect and keep the catalog."""
    if "://" not in location:
        path = Path(os.path.abspath(os.path.expanduser(location)))
        return Location(str(path), LITE_COLLECTION, None, path / CATALOG, True)
    url = urlparse(location)
    scheme = {"milvus": "http", "milvus+https": "https"}.get(url.scheme)
    collection = url.path.strip("/")
    if scheme is None or not url.hostname or not collection or "/" in collection:
        raise UsageError(f"invalid Milvus location {location!r}; use milvus://HOST:PORT/COLLECTION "
                         "(or milvus+https://...), e.g. milvus://localhost:19530/photos")
    db = parse_qs(url.query).get("db", [None])[0]
    port = url.port or 19530
    root = Path(os.environ.get("FSCLIP_DATA") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share"), "fsclip"))
    state = root / "milvus" / f"{url.hostname}_{port}" / (db or "default") / collection
    return Location(f"{scheme}://{url.hostname}:{port}", collection, db, state, False)


def _client(loc: Location):
    try:
        import pymilvus  # noqa: F401
        if loc.lite:
            import milvus_lite  # noqa: F401
    except ImportError as e:
        raise UsageError(f"the Milvus store needs pymilvus and milvus-lite ({e.name} is missing): {INSTALL}") from None
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    kwargs = {"token": os.environ["MILVUS_TOKEN"]} if os.environ.get("MILVUS_TOKEN") else {}
    if loc.db:
        kwargs["db_name"] = loc.db
    try:
        return _Client(MilvusClient(loc.uri, **kwargs), loc.uri, MilvusException)
    except MilvusException as e:
        if loc.lite:
            raise IndexError_(f"cannot open {loc.uri}: {e.message}; Milvus Lite lets one process at a time "
                              "open it (is `fsclip serve` running on it?), else it is not a Milvus Lite index") from None
        raise IndexError_(f"cannot reach Milvus at {loc.uri}: {e.message}") from None


class _Client:
    """A `MilvusClient` whose errors are `IndexError_` (one line on the command line, 503 in the service)."""

    def __init__(self, client, uri: str, errors: type[Exception]):
        self._client, self._uri, self._errors = client, uri, errors

    def __getattr__(self, name: str):
        method = getattr(self._client, name)

        def call(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except self._errors as e:
                raise IndexError_(f"Milvus at {self._uri}: {name} failed: {getattr(e, 'message', e)}") from None

        return call


def _literal(text: str) -> str:
    """A string literal of Milvus's filter language."""
    return '"' + "".join(_ESCAPES.get(c, c) for c in text) + '"'


def encode_path(path: str) -> tuple[str, bool]:
    """A path as the collection stores it (VARCHAR must be UTF-8): the name itself, or for a name that is
    not UTF-8, its bytes with `\\` doubled and the undecodable ones written `\\xNN` (then True)."""
    try:
        path.encode("utf-8")
        return path, False
    except UnicodeEncodeError:
        raw = os.fsencode(path).replace(b"\\", b"\\\\")
        return raw.decode("utf-8", "backslashreplace"), True


def decode_path(text: str, escaped: bool) -> str:
    if not escaped:
        return text
    out, i, raw = bytearray(), 0, text.encode("utf-8")
    while i < len(raw):
        if raw[i : i + 2] == b"\\\\":
            out += b"\\"
            i += 2
        elif raw[i : i + 2] == b"\\x":
            out.append(int(raw[i + 2 : i + 4], 16))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def _like(text: str) -> tuple[str, bool]:
    """A LIKE pattern matching `text` literally, and whether it matches nothing else (no `%`/`_` in it)."""
    return text.replace("%", "_"), "%" not in text and "_" not in text


def _glob_like(pattern: str) -> tuple[str, bool]:
    """A LIKE pattern matching at least what GLOB `pattern` matches, and whether exactly that."""
    out, exact, i = [], True, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append("%")
        elif c == "?":
            out.append("_")
        elif c == "[":
            j = i + 1
            j += j < len(pattern) and pattern[j] == "^"
            j += j < len(pattern) and pattern[j] == "]"
            i = pattern.index("]", j)
            out.append("_")
            exact = False
        else:
            part, same = _like(c)
            out.append(part)
            exact &= same
        i += 1
    return "".join(out), exact


def _visible(gen: int) -> str:
    return f"added_gen <= {gen} and (removed_gen == 0 or removed_gen > {gen})"


def milvus_filter(where: Where | None, gen: int) -> tuple[str, bool]:
    """`where` at generation `gen` as a Milvus filter, and whether hits must still be checked (`Where.matches`)."""
    conds, exact = [_visible(gen)], True
    if where is None:
        return conds[0], True
    if where.path_glob is not None:
        like, same = _glob_like(encode_path(where.path_glob)[0])
        conds.append(f"path like {_literal(like)}")
        exact &= same
    if where.path_prefix is not None:
        like, same = _like(encode_path(where.path_prefix)[0])
        conds.append(f"path like {_literal(like + '%')}")
        exact &= same
    after, before = where.bounds_ns()
    if after is not None:
        conds.append(f"mtime_ns >= {after}")
    if before is not None:
        conds.append(f"mtime_ns < {before}")
    for name, field, op in (("min_width", "width", ">="), ("max_width", "width", "<="),
                            ("min_height", "height", ">="), ("max_height", "height", "<=")):
        value = getattr(where, name)
        if value is not None:
            conds.append(f"{field} {op} {int(value)}")
    return " and ".join(f"({c})" for c in conds), exact


def _entry(row: dict) -> Entry:
    return Entry(int(row["id"]), decode_path(row["path"], bool(row["path_escaped"])), int(row["size"]),
                 int(row["mtime_ns"]), row.get("width"), row.get("height"), row.get("dev"), row.get("ino"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class MilvusState:
    nprobe: int  # 0 on a FLAT index


class MilvusStore(Store):
    """A Milvus collection (Lite or server); see the module doc."""

    engine = "milvus"

    def __init__(self, location: str, loc: Location, client):
        self.location = location
        self.loc = loc
        self.catalog_dir = loc.catalog_dir
        self.path = Path(loc.uri) if loc.lite else None
        self.client = client
        self.collection = loc.collection
        self._cons = catalog.Connections()

    # -- finding and creating
    @classmethod
    def claims(cls, location: str) -> bool:
        if location.startswith(("milvus://", "milvus+https://")):
            return True
        # a FAISS index folder that happens to be named *.db stays a FAISS index
        return location.endswith(".db") and not os.path.isfile(os.path.join(location, catalog.DB_NAME))

    @classmethod
    def exists(cls, location: str) -> bool:
        loc = parse_location(location)
        if loc.lite and not os.path.isdir(loc.uri):
            return os.path.lexists(loc.uri)
        client = _client(loc)
        try:
            return client.has_collection(loc.collection)
        finally:
            client.close()

    @classmethod
    def create(cls, location: str, info: dict[str, str], *, overwrite: bool) -> MilvusStore:
        loc = parse_location(location)
        if loc.lite:
            if os.path.exists(loc.uri) and not os.path.isdir(os.path.join(loc.uri, "collections")):
                raise IndexError_(f"{location} exists and is not a Milvus Lite index; refusing to use it")
            Path(loc.uri).parent.mkdir(parents=True, exist_ok=True)
        client = _client(loc)
        try:
            if client.has_collection(loc.collection):
                if not overwrite:
                    raise IndexError_(f"{location} already exists; open it, or overwrite it (--overwrite) "
                                      "to start over")
                client.drop_collection(loc.collection)
            info = {**info, "roots": "[]", "bad_files": "0", "max_id": "0",
                    "schema_version": str(catalog.SCHEMA_VERSION)}
            _create_collection(client, loc.collection, int(info["dim"]), info)
            _new_catalog(loc.catalog_dir, info)
        except BaseException:
            client.close()
            raise
        return cls(location, loc, client)

    @classmethod
    def open(cls, location: str) -> MilvusStore:
        loc = parse_location(location)
        if loc.lite and not os.path.isdir(loc.uri):
            raise IndexError_(f"no index at {location}; build one with `fsclip index build PHOTOS --index {location}`")
        client = _client(loc)
        try:
            if not client.has_collection(loc.collection):
                raise IndexError_(f"no index at {location}; build one with `fsclip index build PHOTOS --index {location}`")
            if "Loaded" not in str(client.get_load_state(loc.collection).get("state")):
                client.load_collection(loc.collection)  # Milvus Lite forgets it between processes
        except BaseException:
            client.close()
            raise
        return cls(location, loc, client)

    def close(self) -> None:
        self._cons.close()
        self.client.close()

    # -- reading
    def _info(self) -> dict[str, str]:
        props = self.client.describe_collection(self.collection).get("properties", {})
        if PROPERTY not in props:
            raise IndexError_(f"{self.location} is a Milvus collection, but not an fsclip index")
        return json.loads(props[PROPERTY])

    def snapshot(self, current: Snapshot | None = None) -> Snapshot:
        info = self._info()
        key = (info["index_id"], info["generation"], info.get("kind"), info.get("nprobe"))
        if current is not None and (current.token, current.info["generation"], current.info.get("kind"),
                                    current.info.get("nprobe")) == key:
            return current
        return Snapshot(int(info["generation"]), MappingProxyType(info), int(info["count"]), info.get("kind", "flat"),
                        info["index_id"], None, MilvusState(int(info.get("nprobe", 0))))

    def search(self, snap: Snapshot, queries: np.ndarray, k: int,
               where: Where | None) -> list[list[tuple[float, Entry]]]:
        expr, exact = milvus_filter(where if where is not None and not where.is_empty() else None, snap.generation)
        params = {"metric_type": "IP"}
        if snap.state.nprobe:
            params["params"] = {"nprobe": snap.state.nprobe}
        queries = np.asarray(queries, np.float32)
        if exact:
            got = self.client.search(self.collection, data=list(queries), filter=expr, limit=k, output_fields=META,
                                     search_params=params)
            return [[(float(h["distance"]), _entry({"id": h["id"], **h["entity"]})) for h in hits] for hits in got]
        out: list[list[tuple[float, Entry]]] = []
        for q in queries:  # some hits may fail the exact check: fetch more until k pass
            limit = min(MAX_LIMIT, 4 * k)
            while True:
                (hits,) = self.client.search(self.collection, data=[q], filter=expr, limit=limit,
                                             output_fields=META, search_params=params)
                found = [(float(h["distance"]), _entry({"id": h["id"], **h["entity"]})) for h in hits]
                found = [(s, e) for s, e in found if where.matches(encode_path(e.path)[0], e.mtime_ns,
                                                                   e.width, e.height)]
                if len(found) >= k or len(hits) < limit or limit >= MAX_LIMIT:
                    break
                limit = min(MAX_LIMIT, limit * 4)
            out.append(found[:k])
        return out

    def lookup(self, snap: Snapshot, path: str) -> Entry | None:
        text, escaped = encode_path(path)
        rows = self.client.query(self.collection, output_fields=META, limit=1,
                                 filter=f"path == {_literal(text)} and path_escaped == {str(escaped).lower()} "
                                        f"and ({_visible(snap.generation)})")
        return _entry(rows[0]) if rows else None

    def entry(self, snap: Snapshot, id: int) -> Entry | None:
        rows = self.client.get(self.collection, ids=[int(id)], output_fields=META)
        return _entry(rows[0]) if rows else None

    def vectors(self, snap: Snapshot, ids: np.ndarray) -> np.ndarray:
        found = self._get_vectors([int(i) for i in ids])
        missing = [int(i) for i in ids if int(i) not in found]
        if missing:
            raise IndexError_(f"index is inconsistent: no stored vector for id {missing[0]}")
        return np.stack([found[int(i)] for i in ids]) if len(ids) else np.empty((0, int(snap.info["dim"])), np.float32)

    def _get_vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        found = {}
        for part in catalog.chunked(ids, BATCH):
            for row in self.client.get(self.collection, ids=part, output_fields=["vector"]):
                found[int(row["id"])] = np.asarray(row["vector"], np.float32)
        return found

    def iter_vectors(self, snap: Snapshot, chunk: int = 8192):
        for rows in self._scan(_visible(snap.generation), ["vector"], int(snap.info.get("max_id", 0)), chunk):
            if rows:
                yield (np.array([r["id"] for r in rows], np.int64), np.array([r["vector"] for r in rows], np.float32))

    def _scan(self, expr: str, fields: list[str], max_id: int, chunk: int = 4096):
        """Rows matching `expr`, `chunk` ids at a time. By id range rather than a query iterator: ids are the
        catalog's (dense, at most `max_id`), and Milvus Lite has no timestamps for iterators."""
        chunk = min(chunk, MAX_LIMIT)
        for lo in range(0, max_id + 1, chunk):
            yield self.client.query(self.collection, filter=f"id >= {lo} and id < {lo + chunk} and ({expr})",
                                    output_fields=fields, limit=chunk)

    def roots(self, snap: Snapshot) -> list[str]:
        return self.roots_of(snap.info)

    def describe(self, snap: Snapshot) -> dict:
        info = snap.info
        index: dict = {"kind": snap.kind}
        if snap.kind != "flat":
            index.update(nlist=int(info.get("nlist", 0)), nprobe=int(info.get("nprobe", 0)),
                         tuned_recall_at_10=float(info.get("tuned_recall", "nan")))
        disk = None
        if self.loc.lite:
            disk = sum(f.stat().st_size for f in Path(self.loc.uri).rglob("*") if f.is_file())
        return {"engine": self.engine, "location": self.location, "collection": self.collection, "index": index,
                "disk_bytes": disk}

    # -- the catalog (on the writing machine)
    def catalog(self, snap: Snapshot | None = None) -> sqlite3.Connection | None:
        try:
            st = os.stat(self.catalog_dir / catalog.DB_NAME)
        except FileNotFoundError:
            return None
        return self._cons.get((st.st_dev, st.st_ino), self.catalog_dir)  # reconnects when the index was rebuilt

    @contextlib.contextmanager
    def writer(self):
        recover_dir(self.catalog_dir)
        stale = self._stale_catalog()
        if stale:
            logger.warning("%s: rebuilding it from the collection (%s images)", stale, self._info()["count"])
            self._adopt()
        with super().writer() as con:
            yield con

    def _stale_catalog(self) -> str | None:
        """Why this machine's catalog cannot be used for the collection, or None when it can."""
        if not (self.catalog_dir / catalog.DB_NAME).is_file():
            return f"no catalog for {self.location} on this machine"
        con = catalog.connect(self.catalog_dir)
        try:
            local = catalog.read_info(con, self.catalog_dir)
        finally:
            con.close()
        info = self._info()
        if local.get("index_id") != info["index_id"]:
            return f"the catalog in {self.catalog_dir} belongs to an index that was replaced"
        if int(local["generation"]) > int(info["generation"]):  # the collection went back (restored)
            return f"the catalog in {self.catalog_dir} is ahead of {self.location}"
        return None

    def _adopt(self) -> None:
        """Rebuild the catalog from the collection (this machine has none: another machine built the index,
        or the state folder was lost). The rows' metadata and the roots come back; vectors stay in Milvus."""
        info = self._info()
        gen = int(info["generation"])
        catalog_info = _catalog_info(info)
        self.catalog_dir.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(self.catalog_dir, overwrite=True) as tmp:
            con = sqlite3.connect(tmp / catalog.DB_NAME, isolation_level=None)
            try:
                catalog.create_schema(con, catalog_info)
                with catalog.tx(con):
                    con.executemany("INSERT INTO roots (path) VALUES (?)",
                                    [(catalog.db_path(p),) for p in self.roots_of(info)])
                    for rows in self._scan(_visible(gen), [*META, "hash", "added_gen"], int(info.get("max_id", 0))):
                        con.executemany(
                            "INSERT INTO files (id, path, size, mtime_ns, dev, ino, hash, width, height, added_gen) "
                            "VALUES (?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?)",
                            [(r["id"], catalog.db_path(decode_path(r["path"], r["path_escaped"])), r["size"],
                              r["mtime_ns"], r["hash"], r.get("width"), r.get("height"), r["added_gen"])
                             for r in rows])
                    # ids must keep growing past every id the collection has used (AUTOINCREMENT's record)
                    top = con.execute("SELECT max(id) FROM files").fetchone()[0] or 0
                    con.execute("INSERT OR REPLACE INTO sqlite_sequence (name, seq) VALUES ('files', ?)",
                                (max(top, int(info.get("max_id", 0))),))
            finally:
                con.close()

    @staticmethod
    def roots_of(info) -> list[str]:
        return [decode_path(text, escaped) for text, escaped in json.loads(info.get("roots", "[]"))]

    def begin(self, con: sqlite3.Connection) -> int:
        info, local = self._info(), catalog.read_info(con, self.location)
        published, gen = int(info["generation"]), int(local["generation"])  # `writer` made sure gen <= published
        if published > gen:  # killed after publishing to Milvus, before the catalog heard: catch up
            with catalog.tx(con):
                catalog.set_info(con, generation=published, count=info["count"], updated=info["updated"])
                con.execute("DELETE FROM vectors WHERE id IN (SELECT id FROM files WHERE added_gen <= ?)",
                            (published,))
            gen = published
        gone = f"removed_gen > 0 and removed_gen <= {gen}"
        if self.client.query(self.collection, filter=gone, output_fields=["id"], limit=1):
            self.client.delete(self.collection, filter=gone)
        with catalog.tx(con):
            con.execute("DELETE FROM vectors WHERE id IN (SELECT id FROM files WHERE removed_gen <= ?)", (gen,))
            con.execute("DELETE FROM files WHERE removed_gen <= ?", (gen,))
        return gen

    def stored_vector(self, con: sqlite3.Connection, id: int) -> np.ndarray | None:
        row = con.execute("SELECT vec FROM vectors WHERE id = ?", (int(id),)).fetchone()
        if row is not None:
            return np.frombuffer(row[0], "<f4").astype(np.float32)
        return self._get_vectors([int(id)]).get(int(id))

    def publish(self, con: sqlite3.Connection, gen: int, new: int, *, ann: AnnConfig,
                text_queries: TextQueries, progress: bool = False) -> tuple[str, int]:
        info, local = self._info(), catalog.read_info(con, self.location)
        added = catalog.ids_where(con, "added_gen = :new AND removed_gen IS NULL", {"new": new})
        gone = catalog.ids_where(con, "removed_gen = :new AND added_gen <= :gen", {"new": new, "gen": gen})
        roots = json.dumps([encode_path(catalog.fs_path(r[0]))
                            for r in con.execute("SELECT path FROM roots ORDER BY path")])
        bad = con.execute("SELECT count(*) FROM errors").fetchone()[0]
        n = int(local["count"]) + len(added) - len(gone)
        kind = fi.choose_kind(n, ann, info.get("kind"))
        if not len(added) and not len(gone) and kind == info.get("kind") and roots == info.get("roots"):
            if str(bad) != info.get("bad_files"):
                self._set_info({**info, "bad_files": str(bad)})
            return kind, n
        self._push(con, added, new)
        self._mark_removed(gone, new)
        self._drop_orphans(con, added, new)
        if self.loc.lite:  # Lite searches rows still in its memtable on a slow path (~20x); a server seals them itself
            self.client.flush(self.collection)
        meta: dict = {}
        changed = int(info.get("changed_since_tune", 0)) + len(added) + len(gone)
        if kind != info.get("kind") or (kind == "ivf" and fi.needs_retrain(int(info.get("ivf_trained_n", 0)), n)):
            nlist = fi.nlist_for(n)
            self._reindex(kind, nlist, ann)
            meta.update(nlist=nlist if kind == "ivf" else 0, nprobe=0, ivf_trained_n=n if kind == "ivf" else 0)
            changed = n
        if kind == "ivf" and changed >= RETUNE_FRACTION * n:
            nprobe, recall = self._tune(con, new, int(info["dim"]), int(meta.get("nlist", info.get("nlist", 0))),
                                        ann, text_queries)
            meta.update(nprobe=nprobe, tuned_recall=f"{recall:.4f}")
            changed = 0
        published = {**info, **{k: str(v) for k, v in meta.items()}, "generation": str(new), "count": str(n),
                     "kind": kind, "roots": roots, "bad_files": str(bad), "updated": _now(),
                     "changed_since_tune": str(changed), "runtime": local.get("runtime", info.get("runtime")),
                     "max_id": str(max(int(info.get("max_id", 0)), catalog_max_id(con)))}
        self._set_info(published)  # the publish: one property write
        with catalog.tx(con):
            catalog.set_info(con, generation=new, count=n, kind=kind, updated=published["updated"])
            con.execute("DELETE FROM vectors WHERE id IN (SELECT id FROM files WHERE added_gen = ?)", (new,))
        return kind, n

    def _set_info(self, info: dict) -> None:
        self.client.alter_collection_properties(self.collection, properties={PROPERTY: json.dumps(info)})

    def _push(self, con: sqlite3.Connection, ids: np.ndarray, new: int) -> None:
        """Upsert the catalog's staged rows (idempotent: keyed by row id)."""
        for part in catalog.chunked([int(i) for i in ids], BATCH):
            q = f"SELECT f.*, v.vec FROM files f JOIN vectors v ON v.id = f.id WHERE f.id IN ({','.join('?' * len(part))})"
            rows = []
            for r in con.execute(q, part):
                text, escaped = encode_path(catalog.fs_path(r["path"]))
                rows.append({"id": r["id"], "vector": np.frombuffer(r["vec"], "<f4").astype(np.float32),
                             "path": text, "path_escaped": escaped, "size": r["size"], "mtime_ns": r["mtime_ns"],
                             "dev": r["dev"], "ino": r["ino"], "hash": r["hash"], "width": r["width"],
                             "height": r["height"], "added_gen": new, "removed_gen": 0})
            if len(rows) != len(part):
                raise IndexError_("index is inconsistent: a staged row has no vector in the catalog")
            self.client.upsert(self.collection, rows)

    def _mark_removed(self, ids: np.ndarray, new: int) -> None:
        """Rows leaving at generation `new`: still visible until it is published."""
        fields = [*META, "hash", "added_gen", "vector"]
        for part in catalog.chunked([int(i) for i in ids], BATCH):
            rows = self.client.get(self.collection, ids=part, output_fields=fields)
            for r in rows:
                r["removed_gen"] = new
                r["vector"] = np.asarray(r["vector"], np.float32)
            if rows:
                self.client.upsert(self.collection, rows)

    def _drop_orphans(self, con: sqlite3.Connection, staged: np.ndarray, new: int) -> None:
        """Rows a killed run pushed for generation `new` that this run no longer stages."""
        top = max(int(self._info().get("max_id", 0)), catalog_max_id(con))
        pushed = {int(r["id"]) for rows in self._scan(f"added_gen >= {new}", ["id"], top, MAX_LIMIT) for r in rows}
        orphans = sorted(pushed - {int(i) for i in staged})
        if orphans:
            self.client.delete(self.collection, ids=orphans)

    def _reindex(self, kind: str, nlist: int, ann: AnnConfig) -> None:
        logger.info("re-indexing %s as %s", self.location, "IVF_FLAT" if kind == "ivf" else "FLAT")
        self.client.release_collection(self.collection)
        self.client.drop_index(self.collection, "vector")
        _index(self.client, self.collection, kind, nlist)

    def _tune(self, con, gen: int, dim: int, nlist: int, ann: AnnConfig,
              text_queries: TextQueries) -> tuple[int, float]:
        """Smallest power-of-two nprobe reaching the recall target on stored and text queries, as in
        `fi.tune_nprobe`, searching through Milvus; exact results from streaming every vector once."""
        rng = np.random.default_rng(ann.seed + 1)
        ids = catalog.ids_where(con, VISIBLE, {"gen": gen})
        qids = np.sort(rng.choice(ids, size=min(len(ids), ann.tune_queries), replace=False))
        found = self._get_vectors([int(i) for i in qids])
        sets = [(np.stack([found[int(i)] for i in qids]), qids)]
        texts = text_queries()
        if texts is not None:
            sets.append((np.asarray(texts, np.float32), None))
        k = 10
        snap = Snapshot(gen, {"dim": str(dim), "max_id": str(catalog_max_id(con))}, 0, "ivf", None)
        exact = [fi.exact_knn(q, self.iter_vectors(snap), k + 1)[0] for q, _ in sets]
        nprobe = 1
        while True:
            recall = 1.0
            for (q, qids_), ex in zip(sets, exact):
                got = self.client.search(self.collection, data=list(q), filter=_visible(gen), limit=k + 1,
                                         search_params={"metric_type": "IP", "params": {"nprobe": nprobe}})
                s = np.full((len(q), k + 1), -np.inf, np.float32)
                i = np.full((len(q), k + 1), -1, np.int64)
                for row, hits in enumerate(got):
                    for col, h in enumerate(hits):
                        s[row, col], i[row, col] = h["distance"], h["id"]
                recall = min(recall, fi.recall_at_k(s, i, ex, k, exclude=qids_))
            if recall >= ann.tune_target or nprobe >= nlist:
                return nprobe, recall
            nprobe = min(nprobe * 2, nlist)


def catalog_max_id(con: sqlite3.Connection | None) -> int:
    """The largest row id the catalog ever gave out (AUTOINCREMENT's record), so scans by id miss none."""
    if con is None:
        return 0
    row = con.execute("SELECT seq FROM sqlite_sequence WHERE name = 'files'").fetchone()
    return int(row[0]) if row else 0


def _index(client, collection: str, kind: str, nlist: int) -> None:
    """Index the vectors (FLAT: exact; IVF_FLAT) and load the collection for search. Not waiting on the
    index build: Milvus searches rows not yet indexed by brute force, and Milvus Lite builds it at once."""
    params = client.prepare_index_params()
    if kind == "ivf":
        params.add_index("vector", index_type="IVF_FLAT", metric_type="IP", params={"nlist": nlist})
    else:
        params.add_index("vector", index_type="FLAT", metric_type="IP")
    client.create_index(collection, params, sync=False)
    client.load_collection(collection)


def _create_collection(client, name: str, dim: int, info: dict[str, str]) -> None:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH)
    schema.add_field("path_escaped", DataType.BOOL)
    schema.add_field("size", DataType.INT64)
    schema.add_field("mtime_ns", DataType.INT64)
    schema.add_field("dev", DataType.INT64, nullable=True)
    schema.add_field("ino", DataType.INT64, nullable=True)
    schema.add_field("hash", DataType.VARCHAR, max_length=64)
    schema.add_field("width", DataType.INT32, nullable=True)
    schema.add_field("height", DataType.INT32, nullable=True)
    schema.add_field("added_gen", DataType.INT64)
    schema.add_field("removed_gen", DataType.INT64)
    client.create_collection(name, schema=schema, consistency_level="Strong", properties={PROPERTY: json.dumps(info)})
    _index(client, name, "flat", 0)


def _catalog_info(info) -> dict[str, str]:
    """The collection's info as the catalog keeps it (it has its own roots, bad files and schema version)."""
    return {k: v for k, v in info.items() if k not in ("roots", "bad_files", "max_id", "schema_version")}


def _new_catalog(folder: Path, info: dict[str, str]) -> None:
    recover_dir(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder, overwrite=True) as tmp:
        con = sqlite3.connect(tmp / catalog.DB_NAME, isolation_level=None)
        try:
            catalog.create_schema(con, _catalog_info(info))
        finally:
            con.close()


register_store(MilvusStore)
