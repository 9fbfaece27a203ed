"""Building and updating an index: scan, diff, embed in committed batches, publish a new generation.

All of it works on the catalog (`fsclip.search.catalog`), whatever the catalog. Every encoded batch is
one SQLite transaction, so a build killed at any point (Ctrl-C, kill -9, power loss) keeps what it
committed; the same command then finds those files staged with their size and mtime, skips them,
embeds the rest and publishes once. Nothing is visible to readers before the store publishes it.
`load_embeddings` stages the rows of `fsclip embed` shards the same way, without the model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources

import numpy as np
from tqdm.auto import tqdm

from fsclip._paths import display_path
from fsclip.encode import iter_encoded
from fsclip.errors import FsclipError, IndexError_, ModelLoadError
from fsclip.images import ImageLoadError
from fsclip.search import catalog
from fsclip.search._scan import normpath, probe, under, walk
from fsclip.search.faiss_index import AnnConfig

__all__ = ["UpdateReport", "combine", "load_embeddings", "remove", "set_ann", "sync"]

logger = logging.getLogger(__name__)

CHUNK = 512  # files hashed, then embedded, per round; bounds memory whatever the collection size
LOAD_BATCH = 4096  # rows of `fsclip embed` shards staged per transaction


@dataclass(frozen=True)
class UpdateReport:
    """What one `add` / `update` did.

    Attributes:
        embedded: images run through the model.
        loaded: rows loaded from `fsclip embed` shards (`load_embeddings`).
        reused: new or changed paths whose content was already indexed (moved, renamed, copied,
            touched): their stored vector was reused, not recomputed.
        unchanged: files with the same size and mtime as indexed.
        resumed: files embedded by an interrupted earlier run and kept.
        removed: entries whose file is gone.
        failed: bad files found by this run (skipped and recorded; see `index info`).
        known_bad: bad files skipped because they have not changed since they failed.
        total: images searchable afterwards.
        missing_roots: roots that do not exist now; their entries are kept.
        unreadable: `(folder, reason)` for folders that could not be listed (permissions); their
            entries are kept, and they are recorded with the bad files.
        kind: FAISS index kind afterwards.
        seconds: wall time.
    """

    embedded: int = 0
    loaded: int = 0
    reused: int = 0
    unchanged: int = 0
    resumed: int = 0
    removed: int = 0
    failed: int = 0
    known_bad: int = 0
    total: int = 0
    missing_roots: tuple[str, ...] = ()
    unreadable: tuple[tuple[str, str], ...] = ()
    kind: str = "flat"
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["missing_roots"] = list(self.missing_roots)
        d["unreadable"] = [{"path": p, "reason": r} for p, r in self.unreadable]
        return d


_tx = catalog.tx


def _range(root: str) -> tuple[bytes, bytes]:
    """[lo, hi) bounds of the stored paths strictly under `root`, for an index range scan."""
    prefix = catalog.db_path(root)
    prefix = prefix if prefix.endswith(b"/") else prefix + b"/"
    return prefix, prefix[:-1] + bytes([prefix[-1] + 1])


def _drop(con: sqlite3.Connection, row_id: int, added_gen: int, new: int) -> None:
    """Remove a live row: staged rows vanish, published ones are marked removed as of `new`."""
    if added_gen >= new:
        con.execute("DELETE FROM vectors WHERE id = ?", (row_id,))
        con.execute("DELETE FROM files WHERE id = ?", (row_id,))
    else:
        con.execute("UPDATE files SET removed_gen = ? WHERE id = ?", (new, row_id))


def _drop_path(con: sqlite3.Connection, path: bytes, new: int) -> None:
    row = con.execute("SELECT id, added_gen FROM files WHERE path = ? AND removed_gen IS NULL", (path,)).fetchone()
    if row is not None:
        _drop(con, row[0], row[1], new)


def _put(con: sqlite3.Connection, item: tuple, meta: tuple, blob: bytes, new: int) -> None:
    """Stage `item` (a scan row: path bytes, size, mtime_ns, dev, ino) with its probe and vector."""
    path, size, mtime_ns, dev, ino = item
    digest, width, height = meta
    _drop_path(con, path, new)
    cur = con.execute(
        "INSERT INTO files (path, size, mtime_ns, dev, ino, hash, width, height, added_gen) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (path, size, mtime_ns, dev, ino, digest, width, height, new),
    )
    con.execute("INSERT INTO vectors (id, vec) VALUES (?, ?)", (cur.lastrowid, blob))
    con.execute("DELETE FROM errors WHERE path = ?", (path,))


def _fail(con: sqlite3.Connection, item: tuple, reason: str, new: int) -> None:
    path, size, mtime_ns = item[:3]
    _drop_path(con, path, new)  # the old vector no longer describes this file
    con.execute("INSERT OR REPLACE INTO errors (path, size, mtime_ns, reason) VALUES (?, ?, ?, ?)",
                (path, size, mtime_ns, reason))


def _safe_probe(path: bytes) -> tuple | str:
    try:
        return probe(catalog.fs_path(path))
    except ImageLoadError as e:
        return str(e)
    except OSError as e:
        return f"cannot read: {e.strerror or e}"


def _scan(con: sqlite3.Connection, roots: list[str], excludes: frozenset[str],
          progress: bool) -> list[tuple[str, str]]:
    """Fill the temp table `scan` with the files under `roots`; returns the folders that could not be listed."""
    unreadable: list[tuple[str, str]] = []
    con.execute("CREATE TEMP TABLE IF NOT EXISTS scan "
                "(path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, dev INTEGER, ino INTEGER)")
    con.execute("DELETE FROM scan")
    bar = tqdm(unit="file", desc="scanning", disable=None if progress else True, leave=False)
    try:
        for root in roots:
            rows = []
            for entry in walk(root, excludes, unreadable):
                rows.append((catalog.db_path(entry.path), *entry[1:]))
                if len(rows) >= 4096:
                    _insert_scan(con, rows)
                    bar.update(len(rows))
                    rows = []
            _insert_scan(con, rows)
            bar.update(len(rows))
    finally:
        bar.close()
    return unreadable


def _insert_scan(con: sqlite3.Connection, rows: list) -> None:
    with _tx(con):
        con.executemany("INSERT OR IGNORE INTO scan VALUES (?, ?, ?, ?, ?)", rows)


def _remove_missing(con: sqlite3.Connection, scanned: list[str], keep: list[str], new: int) -> int:
    """Drop entries under the scanned roots whose file was not found, except under the folders `keep`
    (other roots, folders that could not be listed), and their bad-file records."""
    removed = 0
    with _tx(con):
        for root in scanned:
            lo, hi = _range(root)
            cond = "(path = :root OR (path >= :lo AND path < :hi)) AND path NOT IN (SELECT path FROM scan)"
            params = {"root": catalog.db_path(root), "lo": lo, "hi": hi}
            gone = con.execute(f"SELECT id, added_gen, path FROM files WHERE removed_gen IS NULL AND {cond}",
                               params).fetchall()
            for row_id, added_gen, path in gone:
                if any(under(catalog.fs_path(path), r) for r in keep):
                    continue
                _drop(con, row_id, added_gen, new)
                removed += added_gen < new  # staged-only rows were never visible
            for (path,) in con.execute(f"SELECT path FROM errors WHERE {cond}", params).fetchall():
                if not any(under(catalog.fs_path(path), r) for r in keep):
                    con.execute("DELETE FROM errors WHERE path = ?", (path,))
    return removed


def _record_unreadable(con: sqlite3.Connection, unreadable: list[tuple[str, str]]) -> None:
    with _tx(con):
        con.executemany("INSERT OR REPLACE INTO errors (path, reason) VALUES (?, ?)",
                        [(catalog.db_path(p), f"cannot read folder: {reason}; its entries are kept")
                         for p, reason in unreadable])
    for path, reason in unreadable:
        logger.warning("cannot read folder %s (%s); keeping its entries", display_path(path), reason)


# A file is unchanged when it is the same file (device and inode) with the same size and mtime; a file
# replaced by a copy (rsync, restore from backup) is re-read, and its vector reused when the content is.
_SAME = "f.size = s.size AND f.mtime_ns = s.mtime_ns AND f.dev IS s.dev AND f.ino IS s.ino"
_TODO = f"""
SELECT s.path, s.size, s.mtime_ns, s.dev, s.ino FROM scan s
WHERE s.path > :last
  AND NOT EXISTS (SELECT 1 FROM files f WHERE f.path = s.path AND f.removed_gen IS NULL AND {_SAME})
  AND NOT EXISTS (SELECT 1 FROM errors e WHERE e.path = s.path AND e.size = s.size AND e.mtime_ns = s.mtime_ns)
ORDER BY s.path LIMIT :n
"""


def _backfill_identity(con: sqlite3.Connection) -> None:
    """Entries without device/inode (from a schema-1 index, or loaded from embeddings): take them from the
    scan where size and mtime match. Driven by the scan, so entries outside the scanned roots cost nothing."""
    with _tx(con):
        con.execute("""
            UPDATE files SET (dev, ino) = (SELECT s.dev, s.ino FROM scan s WHERE s.path = files.path)
            WHERE path IN (SELECT path FROM scan) AND ino IS NULL AND removed_gen IS NULL AND EXISTS (
                SELECT 1 FROM scan s WHERE s.path = files.path AND s.size = files.size
                AND s.mtime_ns = files.mtime_ns)""")


def _counts(con: sqlite3.Connection, gen: int) -> dict[str, int]:
    same = f"FROM scan s JOIN files f ON f.path = s.path AND f.removed_gen IS NULL AND {_SAME}"
    q = lambda sql, *a: con.execute(sql, a).fetchone()[0]  # noqa: E731
    unchanged = q(f"SELECT count(*) {same} WHERE f.added_gen <= ?", gen)
    resumed = q(f"SELECT count(*) {same} WHERE f.added_gen > ?", gen)
    known_bad = q("SELECT count(*) FROM scan s JOIN errors e ON e.path = s.path AND e.size = s.size "
                  "AND e.mtime_ns = s.mtime_ns")
    total = q("SELECT count(*) FROM scan")
    return dict(unchanged=unchanged, resumed=resumed, known_bad=known_bad,
                todo=total - unchanged - resumed - known_bad)


def _known_vector(con: sqlite3.Connection, index, digest: str) -> bytes | None:
    """The stored vector of content already indexed (in the catalog, or only in the store), or None."""
    row = con.execute("SELECT f.id, v.vec FROM files f LEFT JOIN vectors v ON v.id = f.id WHERE f.hash = ? "
                      "ORDER BY v.vec IS NULL LIMIT 1", (digest,)).fetchone()
    if row is None:
        return None
    if row[1] is not None:
        return row[1]
    vec = index.store.stored_vector(con, row[0])
    return None if vec is None else catalog.to_blob(vec)


def _embed(con, index, new: int, todo: int, batch_size: int, num_workers: int | None,
           progress: bool) -> dict[str, int]:
    """Hash the files to (re)index, reuse stored vectors for known content, embed the rest."""
    counts = dict(embedded=0, reused=0, failed=0)
    bar = tqdm(total=todo, unit="img", desc="indexing", disable=None if progress else True, smoothing=0.1)
    workers = num_workers or min(4, os.cpu_count() or 1)
    last = ""
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsclip-hash") as pool:
            while True:
                chunk = [tuple(r) for r in con.execute(_TODO, {"last": last, "n": CHUNK}).fetchall()]
                if not chunk:
                    break
                last = chunk[-1][0]
                metas = list(pool.map(_safe_probe, [c[0] for c in chunk]))
                to_embed: list[tuple[tuple, tuple]] = []
                twins: dict[str, list[tuple[tuple, tuple]]] = {}  # same content within this chunk
                with _tx(con):
                    for item, meta in zip(chunk, metas):
                        if isinstance(meta, str):
                            _fail(con, item, meta, new)
                            logger.warning("skipping %s: %s", display_path(catalog.fs_path(item[0])), meta)
                            counts["failed"] += 1
                            bar.update(1)
                            continue
                        if meta[0] in twins:
                            twins[meta[0]].append((item, meta))
                            continue
                        known = _known_vector(con, index, meta[0])
                        if known is not None:
                            _put(con, item, meta, known, new)
                            counts["reused"] += 1
                            bar.update(1)
                        else:
                            to_embed.append((item, meta))
                            twins[meta[0]] = []
                if not to_embed:
                    continue
                paths = [catalog.fs_path(item[0]) for item, _ in to_embed]
                # the model loads only once something needs embedding: a no-op update stays instant
                for batch in iter_encoded(index.backend, paths, batch_size=batch_size, num_workers=num_workers):
                    feats = batch.features.cpu().numpy()  # (len(indices), D)
                    done = 0
                    with _tx(con):
                        for row, i in enumerate(batch.indices):
                            item, meta = to_embed[i]
                            blob = catalog.to_blob(feats[row])
                            _put(con, item, meta, blob, new)
                            for twin, twin_meta in twins[meta[0]]:
                                _put(con, twin, twin_meta, blob, new)
                            counts["embedded"] += 1
                            counts["reused"] += len(twins[meta[0]])
                            done += 1 + len(twins[meta[0]])
                        for i, reason in batch.errors:
                            item, meta = to_embed[i]
                            for bad in (item, *(t for t, _ in twins[meta[0]])):
                                _fail(con, bad, reason, new)
                                counts["failed"] += 1
                                done += 1
                    bar.update(done)
    finally:
        bar.close()
    return counts


def sync(index, roots: list[str] | None, *, register: bool, batch_size: int = 32,
         num_workers: int | None = None, progress: bool = False) -> UpdateReport:
    """Bring the index in line with the files under `roots` (all stored roots when None), then publish."""
    t0 = time.perf_counter()
    with index._writer() as con:
        gen = index.store.begin(con)
        new = gen + 1
        if register:
            with _tx(con):
                for root in roots:
                    con.execute("INSERT OR IGNORE INTO roots (path) VALUES (?)", (catalog.db_path(root),))
                    lo, hi = _range(root)
                    con.execute("DELETE FROM excludes WHERE path = ? OR (path >= ? AND path < ?)",
                                (catalog.db_path(root), lo, hi))
        all_roots = [catalog.fs_path(r[0]) for r in con.execute("SELECT path FROM roots ORDER BY path")]
        roots = all_roots if roots is None else roots
        excludes = frozenset(catalog.fs_path(r[0]) for r in con.execute("SELECT path FROM excludes"))
        present = [r for r in roots if os.path.isdir(r) or os.path.isfile(r)]
        missing = tuple(r for r in roots if r not in present)
        for r in missing:
            logger.warning("root %s does not exist (unmounted?); keeping its entries", display_path(r))
        unreadable = _scan(con, present, excludes, progress)
        others = [r for r in all_roots if r not in present and not any(under(r, p) for p in present)]
        removed = _remove_missing(con, present, others + [p for p, _ in unreadable], new)
        _record_unreadable(con, unreadable)
        _backfill_identity(con)
        counts = _counts(con, gen)
        done = _embed(con, index, new, counts.pop("todo"), batch_size, num_workers, progress)
        if done["embedded"]:
            _note_runtime(con, index.backend.runtime)
        kind, total = _publish(index, con, gen, new, progress)
    return UpdateReport(removed=removed, **counts, **done, total=total, missing_roots=missing,
                        unreadable=tuple(unreadable), kind=kind, seconds=time.perf_counter() - t0)


def combine(load: UpdateReport, scan: UpdateReport) -> UpdateReport:
    """One report for a load of embeddings followed by a scan of the folders."""
    return dataclasses.replace(scan, loaded=load.loaded, failed=load.failed + scan.failed,
                               seconds=load.seconds + scan.seconds)


def load_embeddings(index, folder: str, *, under: list[str] = (), progress: bool = False) -> UpdateReport:
    """Load the rows of a finished `fsclip embed` output folder into the index, without re-encoding.

    The shards' model (weights fingerprint and dim, from the manifest) must be the index's. A path
    already indexed with the same content hash, size and mtime is left as it is, so loading the same
    shards twice adds nothing; a path indexed with other content is replaced. Paths need not exist
    here: the index records their path and hash, and serving checks the file as it always does (its
    device/inode are recorded when the file is here with the recorded size and mtime). Files the embed
    run could not use are recorded as bad files, except those under the index's folders or `under` (a
    scan of those reports them itself). Nothing is removed (`remove` does that). Staged in
    committed batches, so a killed load resumes.
    """
    from fsclip.embed import iter_tables, read_manifest

    t0 = time.perf_counter()
    under = [normpath(r) for r in under] + index.roots()
    manifest = read_manifest(folder)
    model = manifest.get("model", {})
    if (str(model.get("fingerprint")), int(model.get("dim", 0))) != (index.fingerprint, index.dim):
        raise IndexError_(
            f"{folder} holds embeddings of model {model.get('spec')!r} (dim {model.get('dim')}, fingerprint "
            f"{model.get('fingerprint')}); index {index.location} was built with {index.model_spec!r} (dim "
            f"{index.dim}, fingerprint {index.fingerprint}): embed with the index's model, or build a new index")
    counts = dict(loaded=0, unchanged=0, resumed=0, failed=0)
    bar = tqdm(total=int(manifest.get("rows", 0)), unit="row", desc="loading", disable=None if progress else True)
    with index._writer() as con:
        gen = index.store.begin(con)
        new = gen + 1
        try:
            for table in iter_tables(folder):
                for batch in table.to_batches(max_chunksize=LOAD_BATCH):
                    with _tx(con):
                        _load_batch(con, batch, index.dim, gen, new, counts)
                    bar.update(batch.num_rows)
        finally:
            bar.close()
        with _tx(con):
            for failed in manifest.get("failed", []):
                if any(_under(failed["path"], root) for root in under):
                    continue
                path = catalog.db_path(failed["path"])
                if con.execute("SELECT 1 FROM files WHERE path = ? AND removed_gen IS NULL", (path,)).fetchone():
                    continue  # indexed meanwhile (e.g. from a later run): the record is stale
                con.execute("INSERT OR REPLACE INTO errors (path, reason) VALUES (?, ?)",
                            (path, f"fsclip embed: {failed['reason']}"))
                counts["failed"] += 1
        if counts["loaded"]:
            _note_runtime(con, model.get("runtime", "torch"))
        kind, total = _publish(index, con, gen, new, progress)
    return UpdateReport(**counts, total=total, kind=kind, seconds=time.perf_counter() - t0)


def _under(path: str, root: str) -> bool:
    return "://" not in path and under(normpath(path), root)


def _load_batch(con: sqlite3.Connection, batch, dim: int, gen: int, new: int, counts: dict[str, int]) -> None:
    """Stage one record batch of an `fsclip embed` shard (see `load_embeddings`)."""
    column = batch.column("embedding")
    # flatten(), not .values: a batch is a slice of its shard, and .values ignores the slice
    vecs = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)
    if vecs.shape[1] != dim:
        raise IndexError_(f"embeddings of dim {vecs.shape[1]} cannot go into an index of dim {dim}")
    vecs = vecs.astype(np.float32)  # float16 shards (`fsclip embed --fp16`) widen exactly
    rows = zip(*(batch.column(c).to_pylist() for c in ("path", "hash", "size", "mtime_ns", "width", "height")))
    for (path, digest, size, mtime_ns, width, height), vec in zip(rows, vecs):
        key = catalog.db_path(path)
        mtime_ns = mtime_ns or 0  # a remote store that did not say
        cur = con.execute("SELECT hash, size, mtime_ns, added_gen FROM files WHERE path = ? AND removed_gen IS NULL",
                          (key,)).fetchone()
        if cur is not None and (cur[0], cur[1], cur[2]) == (digest, size, mtime_ns):
            counts["resumed" if cur[3] > gen else "unchanged"] += 1
            continue
        dev = ino = None
        if "://" not in path:
            try:
                st = os.stat(path)
                if (st.st_size, st.st_mtime_ns) == (size, mtime_ns):  # the file that was embedded
                    dev, ino = st.st_dev, st.st_ino
            except OSError:
                pass
        _put(con, (key, size, mtime_ns, dev, ino), (digest, width, height), catalog.to_blob(vec), new)
        counts["loaded"] += 1


def _note_runtime(con: sqlite3.Connection, runtime: str) -> None:
    """The index's `runtime`: every runtime whose vectors it holds (comma-separated)."""
    recorded = catalog.read_info(con).get("runtime", "torch")
    runtimes = sorted({*recorded.split(","), runtime})
    with _tx(con):
        catalog.set_info(con, runtime=",".join(runtimes))


def remove(index, paths: list[str]) -> int:
    """Remove files / folders from the index and keep them out of later updates."""
    with index._writer() as con:
        gen = index.store.begin(con)
        new = gen + 1
        roots = [catalog.fs_path(r[0]) for r in con.execute("SELECT path FROM roots")]
        removed = 0
        with _tx(con):
            for path in paths:
                lo, hi = _range(path)
                cond = "(path = :p OR (path >= :lo AND path < :hi))"
                params = {"p": catalog.db_path(path), "lo": lo, "hi": hi}
                for row_id, added_gen in con.execute(
                        f"SELECT id, added_gen FROM files WHERE removed_gen IS NULL AND {cond}", params).fetchall():
                    _drop(con, row_id, added_gen, new)
                    removed += added_gen < new
                con.execute(f"DELETE FROM errors WHERE {cond}", params)
                if path in roots:
                    con.execute("DELETE FROM roots WHERE path = ?", (catalog.db_path(path),))
                elif any(under(path, r) for r in roots):
                    con.execute("INSERT OR IGNORE INTO excludes (path) VALUES (?)", (catalog.db_path(path),))
        _publish(index, con, gen, new, progress=False)
    return removed


def _publish(index, con: sqlite3.Connection, gen: int, new: int, progress: bool) -> tuple[str, int]:
    """Everything is staged for generation `new`: have the store publish it. Returns (kind, count)."""
    ann = AnnConfig(**json.loads(catalog.read_info(con)["ann"]))
    return index.store.publish(con, gen, new, ann=ann, text_queries=lambda: _tuning_vectors(index),
                               progress=progress)


def set_ann(index, ann: AnnConfig) -> None:
    """Record new index settings; the next publish applies them."""
    with index._writer() as con, _tx(con):
        catalog.set_info(con, ann=json.dumps(asdict(ann)))


def _tuning_vectors(index) -> np.ndarray | None:
    """The index's model's embeddings of `tuning_queries()`, or None when it cannot give them."""
    try:
        return index.encode_text(tuning_queries())
    except ModelLoadError as e:  # tuned on image queries only: text recall may fall short
        logger.warning("cannot load the index's model to tune on text queries (%s); tuning on images only", e)
    except FsclipError as e:  # an image-only model: there are no text queries to tune for
        logger.info("tuning on image queries only: %s", e)
    return None


@functools.cache
def tuning_queries() -> list[str]:
    data = json.loads((resources.files("fsclip.search") / "tuning_queries.json").read_text(encoding="utf-8"))
    return list(data["queries"])
