"""The FAISS store (the default): one folder holding the catalog and the FAISS index of its vectors.

Layout of `my.idx/`:
    meta.sqlite             the catalog (`fsclip.search.catalog`): files and their vectors, bad files,
                            roots, model spec / dim / fingerprint, the published generation, and the
                            base generation with its FAISS file's checksum
    vectors-<base>.faiss    the FAISS index of the base generation
    write.lock              held (flock) by the one process allowed to update

Publishing a generation does not rewrite the FAISS file: that would cost O(collection) for one changed
photo and make every reader reload it. Generation G is searched as

    base (vectors-<base>.faiss)  minus  tombstones  plus  delta

where the tombstones are the base's entries removed since, and the delta holds the entries added since
that are visible at G, searched exactly in memory. Publishing k changed files is one catalog
transaction (O(k) rows); a reader moving to the new generation reads the new delta vectors and the
tombstone ids and keeps its base. When delta + tombstones pass `MERGE_FRACTION` of the collection (or
`MERGE_MAX` rows), or the collection needs another kind of index (flat -> IVF, a retrain, a memory
budget), the writer merges after publishing: it writes a new base for the published generation
(temp file, fsync, rename), records it in one transaction and deletes the old file. So an update costs
O(k) plus, amortised, a few full writes per `1 / MERGE_FRACTION` changes, and readers are on one
consistent snapshot throughout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType

import faiss
import numpy as np
from tqdm.auto import tqdm

from fsclip._io import atomic_dir, recover_dir
from fsclip.errors import IndexError_
from fsclip.search import catalog
from fsclip.search import faiss_index as fi
from fsclip.search.catalog import VISIBLE
from fsclip.search.faiss_index import AnnConfig
from fsclip.search.query import Where
from fsclip.search.stores.base import Entry, IndexChangedError, Snapshot, Store, TextQueries, register_store

__all__ = ["FaissStore", "faiss_name"]

logger = logging.getLogger(__name__)

MERGE_FRACTION = 0.05  # merge when delta + tombstones reach this fraction of the collection ...
MERGE_MAX = 65_536  # ... or this many rows (bounds the delta every reader keeps in memory)
RETUNE_FRACTION = 0.05  # re-tune IVF nprobe at a merge once this fraction of the collection has changed
_DELTA = f"added_gen > :base AND {VISIBLE}"
_TOMBSTONES = "added_gen <= :base AND removed_gen > :base AND removed_gen <= :gen"


def faiss_name(gen: int) -> str:
    return f"vectors-{gen}.faiss"


class Damaged(Exception):
    """The base FAISS file is missing or does not match meta.sqlite (the message says how)."""


class Republished(Exception):
    """The FAISS file went away because a writer merged a newer base meanwhile: read again."""


@dataclass(frozen=True)
class FaissState:
    """What a reader searches at one generation: base - tombstones + delta."""

    base: faiss.Index
    base_generation: int
    delta_ids: np.ndarray  # (m,) sorted
    delta_vecs: np.ndarray  # (m, D)
    tombstones: np.ndarray  # (t,) sorted
    rerank: int  # compressed base: candidates re-scored exactly, as a multiple of k; 0: exact codes


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _entry(row) -> Entry:
    return Entry(int(row["id"]), catalog.fs_path(row["path"]), int(row["size"]), int(row["mtime_ns"]),
                 row["width"], row["height"], row["dev"], row["ino"])


def folder_id(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise IndexError_(f"index {path} no longer exists") from None
    return st.st_dev, st.st_ino


def _base_generation(info) -> int:
    return int(info.get("base_generation", info["generation"]))  # schema 2: the base is the published state


def _published_base(con: sqlite3.Connection) -> int:
    rows = dict(con.execute("SELECT key, value FROM info WHERE key IN ('generation', 'base_generation')").fetchall())
    value = rows.get("base_generation", rows.get("generation"))
    return int(value) if value is not None and str(value).isdigit() else -1


def read_base(path: Path, con: sqlite3.Connection, info) -> faiss.Index:
    """The base FAISS file of `info`, checked against meta.sqlite.

    Checks its checksum (recorded when it was written), dimension, vector count and id range, so a
    file from another index or a damaged one is never searched. Raises `Damaged` or `Republished`.
    """
    gen = _base_generation(info)
    file = path / faiss_name(gen)
    fix = f"run `fsclip index update {path}` to rebuild it from the vectors in {catalog.DB_NAME}"
    try:
        index, checksum = fi.read_index_checksum(file)
    except FileNotFoundError:
        if _published_base(con) != gen:
            raise Republished from None
        raise Damaged(str(catalog.damaged(path, f"{file.name} is missing", fix))) from None
    except RuntimeError:
        raise Damaged(str(catalog.damaged(path, f"{file.name} is not a readable FAISS file", fix))) from None
    expected = info.get("faiss_checksum")
    count = int(info.get("base_count", info["count"]))
    db = catalog.DB_NAME
    problem = None
    if expected is not None and checksum != expected:
        problem = f"{file.name} is not the file {db} recorded (checksum {checksum}, expected {expected})"
    elif index.d != int(info["dim"]):
        problem = f"{file.name} holds {index.d}-dim vectors, {db} says {info['dim']}"
    elif index.ntotal != count:
        problem = f"{file.name} holds {index.ntotal} vectors, {db} lists {count}"
    else:
        ids = fi.id_range(index)
        lo, hi = con.execute("SELECT min(id), max(id) FROM files").fetchone()
        if ids is not None and (lo is None or ids[0] < lo or ids[1] > hi):
            problem = f"{file.name} holds ids {ids[0]}..{ids[1]}, not those of {db}"
    if problem:
        raise Damaged(str(catalog.damaged(path, problem, fix)))
    return index


class FaissStore(Store):
    """An index folder: the catalog (which also answers filters and lookups) and FAISS files."""

    engine = "faiss"
    default = True
    supports_max_memory = True

    def __init__(self, path: Path):
        self.path = path
        self.location = str(path)
        self.catalog_dir = path
        self._cons = catalog.Connections()

    # -- finding and creating
    @classmethod
    def claims(cls, location: str) -> bool:
        return True  # the default: any location no other engine claims

    @classmethod
    def exists(cls, location: str) -> bool:
        recover_dir(location)
        return os.path.lexists(location)

    @classmethod
    def create(cls, location: str, info: dict[str, str], *, overwrite: bool) -> FaissStore:
        path = Path(location)
        recover_dir(path)  # an overwrite that crashed midway: its old index is back before we look
        if path.exists():
            if not overwrite:
                raise IndexError_(f"{path} already exists; open it, or overwrite it (--overwrite) to start over")
            if not (path / catalog.DB_NAME).is_file():
                raise IndexError_(f"{path} exists and is not an fsclip index; refusing to overwrite it")
        info = {**info, "base_generation": 0, "base_count": 0}
        with atomic_dir(path, overwrite=True) as tmp:
            info["faiss_checksum"] = fi.write_index(fi.new_flat(int(info["dim"])), tmp / faiss_name(0))
            con = sqlite3.connect(tmp / catalog.DB_NAME, isolation_level=None)
            try:
                catalog.create_schema(con, info)
            finally:
                con.close()
        return cls.open(path)

    @classmethod
    def open(cls, location: str) -> FaissStore:
        path = Path(location)
        recover_dir(path)
        if not path.is_dir():
            raise IndexError_(f"no index at {path}; build one with `fsclip index build PHOTOS --index {path}`")
        return cls(path)

    def close(self) -> None:
        self._cons.close()

    # -- the catalog
    def catalog(self, snap: Snapshot | None = None) -> sqlite3.Connection:
        return self._connection(snap.token if snap is not None else folder_id(self.path))

    def _connection(self, folder: tuple[int, int]) -> sqlite3.Connection:
        """This thread's connection to the index folder `folder` (its device/inode)."""

        def still_there():
            if folder_id(self.path) != folder:
                raise IndexChangedError(f"index {self.path} was replaced while it was being read; retry")

        return self._cons.get(folder, self.path, still_there)

    # -- reading
    def snapshot(self, current: Snapshot | None = None) -> Snapshot:
        for _ in range(5):
            folder = folder_id(self.path)
            try:
                con = self._connection(folder)
            except IndexChangedError:
                continue
            info = catalog.read_info(con, self.path)
            gen, base_gen = int(info["generation"]), _base_generation(info)
            same = current is not None and current.token == folder
            if same and _published(current.info) == _published(info):  # a merge changes the base only
                return current
            prev = current.state if same and current.state is not None else None
            if prev is not None and prev.base_generation != base_gen:
                prev = None
            try:
                base = prev.base if prev is not None else read_base(self.path, con, info)
            except Republished:
                continue
            except Damaged as e:  # searches raise it; info shows it; update repairs it
                return Snapshot(gen, MappingProxyType(info), int(info["count"]), info.get("kind", "flat"),
                                folder, str(e))
            state = _read_state(con, info, base, base_gen, gen, prev)
            count = int(base.ntotal) - len(state.tombstones) + len(state.delta_ids)
            if count != int(info["count"]):
                if _published_generation(con) != gen:
                    continue  # a writer published (and forgot rows of) a newer generation meanwhile
                problem = f"{faiss_name(base_gen)} and its changes since hold {count} vectors, {catalog.DB_NAME} " \
                          f"lists {info['count']}"
                damage = str(catalog.damaged(self.path, problem, f"run `fsclip index update {self.path}`"))
                return Snapshot(gen, MappingProxyType(info), int(info["count"]), fi.index_kind(base), folder, damage)
            return Snapshot(gen, MappingProxyType(info), count, fi.index_kind(base), folder, None, state)
        raise IndexError_(f"index {self.path} changed repeatedly while opening; try again")

    def search(self, snap: Snapshot, queries: np.ndarray, k: int,
               where: Where | None) -> list[list[tuple[float, Entry]]]:
        state: FaissState = snap.searchable()
        con = self.catalog(snap)
        allowed = None
        if where is not None and not where.is_empty():
            cond, params = where.to_sql()
            allowed = catalog.ids_where(con, f"{VISIBLE} AND ({cond})", {"gen": snap.generation, **params})
            if len(allowed) == 0:
                return [[] for _ in queries]
        parts = []
        if state.base.ntotal:
            if state.rerank:
                dim = state.base.d
                _, cand = fi.search(state.base, queries, k * state.rerank, allowed, excluded=state.tombstones)
                parts.append(fi.refine(queries, cand, lambda ids: catalog.vectors_found(con, ids, dim), k))
            else:
                parts.append(fi.search(state.base, queries, k, allowed, excluded=state.tombstones))
        if len(state.delta_ids):
            parts.append(_search_delta(state, queries, k, allowed))
        if not parts:
            return [[] for _ in queries]
        scores, ids = fi.merge_topk(parts, k)
        rows = catalog.rows_for(con, {int(i) for i in ids.ravel() if i >= 0})
        return [[(float(s), _entry(rows[int(i)])) for s, i in zip(srow, irow) if i >= 0 and int(i) in rows]
                for srow, irow in zip(scores, ids)]

    def lookup(self, snap: Snapshot, path: str) -> Entry | None:
        row = self.catalog(snap).execute(f"SELECT * FROM files WHERE path = :path AND {VISIBLE}",
                                         {"path": catalog.db_path(path), "gen": snap.generation}).fetchone()
        return None if row is None else _entry(row)

    def entry(self, snap: Snapshot, id: int) -> Entry | None:
        row = self.catalog(snap).execute("SELECT * FROM files WHERE id = ?", (int(id),)).fetchone()
        return None if row is None else _entry(row)

    def vectors(self, snap: Snapshot, ids: np.ndarray) -> np.ndarray:
        return catalog.vectors_for(self.catalog(snap), ids, int(snap.info["dim"]))

    def iter_vectors(self, snap: Snapshot, chunk: int = 8192):
        return catalog.iter_vectors(self.catalog(snap), VISIBLE, {"gen": snap.generation}, int(snap.info["dim"]),
                                    chunk)

    def roots(self, snap: Snapshot) -> list[str]:
        return [catalog.fs_path(r[0]) for r in self.catalog(snap).execute("SELECT path FROM roots ORDER BY path")]

    def describe(self, snap: Snapshot) -> dict:
        info = snap.info
        index: dict = {"kind": snap.kind}
        if snap.kind != "flat":
            index.update(nlist=int(info.get("nlist", 0)), nprobe=int(info.get("nprobe", 0)),
                         tuned_recall_at_10=float(info.get("tuned_recall", "nan")))
            if snap.kind in fi.COMPRESSED:
                index["rerank"] = int(info.get("rerank", 0))
        state = snap.state
        if state is not None:
            index.update(base_generation=state.base_generation, delta=len(state.delta_ids),
                         tombstones=len(state.tombstones))
        return {"engine": self.engine, "location": self.location, "index": index,
                "disk_bytes": sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())}

    # -- writing
    def begin(self, con: sqlite3.Connection) -> int:
        """Forget rows removed before the published generation that no FAISS file holds any more: those
        of the delta, and those the base was rebuilt without (readers that could see them have moved on)."""
        for tmp in self.path.glob(".vectors-*.tmp"):  # a FAISS file a killed writer did not finish
            tmp.unlink(missing_ok=True)
        info = catalog.read_info(con, self.path)
        gen, base = int(info["generation"]), _base_generation(info)
        gone = "removed_gen <= :gen AND (removed_gen <= :base OR added_gen > :base)"
        with catalog.tx(con):
            con.execute(f"DELETE FROM vectors WHERE id IN (SELECT id FROM files WHERE {gone})", {"gen": gen, "base": base})
            con.execute(f"DELETE FROM files WHERE {gone}", {"gen": gen, "base": base})
        return gen

    def stored_vector(self, con: sqlite3.Connection, id: int) -> np.ndarray | None:
        row = con.execute("SELECT vec FROM vectors WHERE id = ?", (int(id),)).fetchone()
        return None if row is None else np.frombuffer(row[0], "<f4").astype(np.float32)

    def publish(self, con: sqlite3.Connection, gen: int, new: int, *, ann: AnnConfig,
                text_queries: TextQueries, progress: bool = False) -> tuple[str, int]:
        """Publish generation `new` in one transaction (O(changes)), then merge if due (see the module doc)."""
        info = catalog.read_info(con, self.path)
        base_gen = _base_generation(info)
        added = con.execute("SELECT count(*) FROM files WHERE added_gen = ? AND removed_gen IS NULL",
                            (new,)).fetchone()[0]
        gone = con.execute("SELECT count(*) FROM files WHERE removed_gen = ? AND added_gen <= ?",
                           (new, gen)).fetchone()[0]
        try:
            base = read_base(self.path, con, info)
        except (Damaged, Republished) as e:  # Republished cannot happen under the write lock
            logger.warning("%s: rebuilding it from %s", str(e).split(";")[0], catalog.DB_NAME)
            base = None
        if not added and not gone:
            published = gen  # nothing to publish; a merge a killed run left undone still completes below
        else:
            n = int(info["count"]) + added - gone
            with catalog.tx(con):
                catalog.set_info(con, generation=new, count=n, updated=_now(), schema_version=catalog.SCHEMA_VERSION,
                                 base_generation=base_gen, base_count=int(info.get("base_count", info["count"])),
                                 changed_since_tune=int(info.get("changed_since_tune", 0)) + added + gone)
            published = new
        info = catalog.read_info(con, self.path)
        plan = self._merge_plan(con, info, base, ann)
        if plan is None:
            return fi.index_kind(base), int(info["count"])
        self._merge(con, info, published, base, plan, ann, text_queries, progress)
        return plan.kind, int(info["count"])

    def _merge_plan(self, con, info, base, ann: AnnConfig) -> fi.Plan | None:
        """The index to write as the new base, or None when the published one can stay."""
        n, dim = int(info["count"]), int(info["dim"])
        gen, base_gen = int(info["generation"]), _base_generation(info)
        current = fi.plan_of(base) if base is not None else None
        reserve = min(MERGE_MAX, int(MERGE_FRACTION * n) + 1) * (4 * dim + 8)  # the largest delta
        plan = fi.plan_index(n, dim, ann, current.kind if current else None, reserve=reserve)
        if ann.max_memory is not None and plan.memory(n, dim) + reserve > ann.max_memory:
            logger.warning("%d images need %.0f MiB in the smallest index (%s) and its delta; over the %.0f MiB "
                           "budget (--max-memory)", n, (plan.memory(n, dim) + reserve) / 2**20, plan.describe(),
                           ann.max_memory / 2**20)
        if plan.kind == "flat" and n >= ann.ann_threshold:
            logger.warning("%d images: exact search; an approximate (IVF) index needs at least %d to train",
                           n, fi.MIN_IVF)
        if current is None or plan.kind != current.kind:
            return plan
        if plan.kind != "flat" and fi.needs_retrain(int(info.get("ivf_trained_n", 0)), n):
            return plan
        if ann.max_memory is not None and current.memory(n, dim) > ann.max_memory - reserve and plan != current:
            return plan
        p = {"base": base_gen, "gen": gen}
        pending = (con.execute(f"SELECT count(*) FROM files WHERE {_DELTA}", p).fetchone()[0]
                   + con.execute(f"SELECT count(*) FROM files WHERE {_TOMBSTONES}", p).fetchone()[0])
        if pending > min(MERGE_MAX, MERGE_FRACTION * n):
            return current  # same structure, changes folded in
        return None

    def _merge(self, con, info, gen: int, base, plan: fi.Plan, ann: AnnConfig, text_queries: TextQueries,
               progress: bool) -> None:
        """Write the base of published generation `gen` (atomically), then record it in one transaction."""
        n, dim, base_gen = int(info["count"]), int(info["dim"]), _base_generation(info)
        current = fi.plan_of(base) if base is not None else None
        changed = int(info.get("changed_since_tune", 0))
        meta: dict = {}
        if current is None or plan != current:
            del base
            built = _build(con, plan, gen, dim, ann, progress)
            meta.update(ivf_trained_n=n if plan.kind != "flat" else 0)
            changed = n  # forces tuning below
        else:
            built = base
            p = {"base": base_gen, "gen": gen}
            tombstones = catalog.ids_where(con, _TOMBSTONES, p)
            if len(tombstones):
                built.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(tombstones, dtype=np.int64)))
            for ids, vecs in catalog.iter_vectors(con, _DELTA, p, dim):
                built.add_with_ids(vecs, ids)
        if plan.kind != "flat" and changed >= RETUNE_FRACTION * n:
            nprobe, rerank, recall = _tune(con, built, gen, dim, ann, text_queries)
            meta.update(nlist=plan.nlist, nprobe=nprobe, rerank=rerank, tuned_recall=f"{recall:.4f}")
            changed = 0
            logger.info("%s nlist=%d: nprobe=%d, rerank %dx give recall@10 %.3f on sample queries",
                        plan.describe(), plan.nlist, nprobe, rerank, recall)
            if recall < ann.recall_target:
                logger.warning("the %s index reaches recall@10 %.3f, below the target %.2f, even scanning every "
                               "list; give it more memory (--max-memory)", plan.describe(), recall, ann.recall_target)
        if int(built.ntotal) != n:
            raise IndexError_(f"index is inconsistent: FAISS holds {built.ntotal} vectors, metadata {n}")
        checksum = fi.write_index(built, self.path / faiss_name(gen))
        with catalog.tx(con):
            catalog.set_info(con, base_generation=gen, base_count=n, faiss_checksum=checksum, kind=plan.kind,
                             changed_since_tune=changed, **meta)
        for f in self.path.glob("vectors-*.faiss"):
            if f.name != faiss_name(gen):
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()


def _published(info) -> tuple:
    """What a reader's state follows: the generation, and the base it is searched over."""
    return info["generation"], _base_generation(info), info.get("faiss_checksum")


def _published_generation(con: sqlite3.Connection) -> int:
    row = con.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()
    return int(row[0]) if row is not None and str(row[0]).isdigit() else -1


def _read_state(con, info, base, base_gen: int, gen: int, prev: FaissState | None) -> FaissState:
    """The delta and tombstones of generation `gen` over `base`; vectors `prev` already holds are reused,
    so moving to the next generation reads only the new ones."""
    dim = int(info["dim"])
    p = {"base": base_gen, "gen": gen}
    ids = catalog.ids_where(con, _DELTA, p)
    vecs = np.empty((len(ids), dim), np.float32)
    known = np.zeros(len(ids), bool)
    if prev is not None and len(prev.delta_ids) and len(ids):
        pos = np.clip(np.searchsorted(prev.delta_ids, ids), 0, len(prev.delta_ids) - 1)
        known = prev.delta_ids[pos] == ids
        vecs[known] = prev.delta_vecs[pos[known]]
    if not known.all():
        vecs[~known] = catalog.vectors_for(con, ids[~known], dim)
    tombstones = catalog.ids_where(con, _TOMBSTONES, p)
    return FaissState(base, base_gen, ids, vecs, tombstones, int(info.get("rerank", 0)))


def _search_delta(state: FaissState, queries: np.ndarray, k: int,
                  allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k over the delta (small: a few percent of the collection at most)."""
    scores = np.ascontiguousarray(queries, dtype=np.float32) @ state.delta_vecs.T  # (B, D) @ (D, m) -> (B, m)
    ids = np.broadcast_to(state.delta_ids, scores.shape)
    if allowed is not None:
        scores[:, ~np.isin(state.delta_ids, allowed)] = -np.inf
    if scores.shape[1] > k:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores, ids = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
    ids = np.where(np.isfinite(scores), ids, -1)
    return scores, ids


def _build(con, plan: fi.Plan, gen: int, dim: int, cfg: AnnConfig, progress: bool) -> faiss.Index:
    """A fresh index over every vector visible at `gen`, streamed from the catalog in chunks."""
    visible = {"gen": gen}
    ids = catalog.ids_where(con, VISIBLE, visible)
    n = len(ids)
    if plan.kind == "flat":
        index = fi.new_flat(dim)
    else:
        size = fi.SAMPLE_PER_LIST * plan.nlist
        if plan.kind in fi.COMPRESSED:
            size = max(size, fi.TRAIN_COMPRESSED)
        rng = np.random.default_rng(cfg.seed)
        sample = rng.choice(ids, size=min(n, size), replace=False)
        logger.info("training %s with %d lists on %d of %d vectors", plan.describe(), plan.nlist, len(sample), n)
        index = fi.new_ivf(catalog.vectors_for(con, np.sort(sample), dim), plan.nlist, seed=cfg.seed,
                           kind=plan.kind, pq_m=plan.pq_m)
    bar = tqdm(total=n, unit="vec", desc=f"building {plan.kind} index", disable=None if progress else True,
               leave=False)
    try:
        for chunk_ids, vecs in catalog.iter_vectors(con, VISIBLE, visible, dim):
            index.add_with_ids(vecs, chunk_ids)
            bar.update(len(chunk_ids))
    finally:
        bar.close()
    return index


def _tune(con, built, gen: int, dim: int, cfg: AnnConfig, text_queries: TextQueries) -> tuple[int, int, float]:
    visible = {"gen": gen}
    rng = np.random.default_rng(cfg.seed + 1)
    ids = catalog.ids_where(con, VISIBLE, visible)
    qids = np.sort(rng.choice(ids, size=min(len(ids), cfg.tune_queries), replace=False))
    sets = [(catalog.vectors_for(con, qids, dim), qids)]
    texts = text_queries()
    if texts is not None:
        sets.append((texts, None))
    fetch = None
    if fi.index_kind(built) in fi.COMPRESSED:
        fetch = lambda ids: catalog.vectors_found(con, ids, dim)  # noqa: E731
    return fi.tune_nprobe(built, sets, lambda: catalog.iter_vectors(con, VISIBLE, visible, dim),
                          cfg.tune_target, fetch=fetch)


register_store(FaissStore)
