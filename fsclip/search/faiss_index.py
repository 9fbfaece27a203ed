"""FAISS index choice, construction, recall tuning and search.

The rule (`choose_kind`, `nlist_for`, `tune_nprobe`):

* fewer than `ann_threshold` vectors (default 50,000): exact inner-product search,
  `IndexIDMap2(IndexFlatIP)`. A flat scan of 50k x 512 floats takes a few ms per query on one core,
  so below that an ANN index buys nothing and costs recall.
* from `ann_threshold` on (and from `MIN_IVF` = 256 vectors, the fewest that train 8 lists of 32):
  `IndexIVFFlat` with inner product, `nlist` = the power of two nearest
  4 sqrt(n), trained (10 k-means iterations) on a random sample of min(n, 32 * nlist) stored
  vectors. `nprobe` is the smallest power of two whose recall@10 against exact search reaches
  `recall_target + tune_margin` on two query sets: `tune_queries` stored vectors (their self-match
  left out) and the model's embeddings of everyday text queries (`tuning_queries.json`). Text
  queries lie away from the image embeddings (CLIP's modality gap) and need 2-4x the nprobe of
  image queries, so tuning on images alone would miss the target for text search.
* hysteresis: an IVF index goes back to flat only below half the threshold; it is retrained when the
  collection has grown or shrunk 4x since training (nlist is then 2x off the rule).

* a memory budget (`AnnConfig.max_memory`, `--max-memory`) picks the most accurate index that fits
  (`plan_index`): exact or IVF-Flat (4 bytes a dimension), else IVF with 8-bit scalar quantised codes
  (IVF-SQ8, 1 byte a dimension), else IVF-PQ with the most sub-quantizer bytes that fit. Compressed
  codes only rank candidates: the top `rerank` x k are re-scored exactly with their full vectors read
  from disk (`refine`), and tuning picks the smallest rerank factor, then the smallest nprobe, that
  reach the recall target on both query sets.

Deletions use FAISS ids (the SQLite row ids): `remove_ids` on the id map or the inverted lists.
Recall is counted as in ann-benchmarks: a returned item is a hit when its score reaches the k-th exact
score, so exact ties (duplicate photos) do not count as misses.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np

from fsclip._io import atomic_write

__all__ = [
    "AnnConfig",
    "Plan",
    "choose_kind",
    "exact_knn",
    "id_range",
    "index_kind",
    "merge_topk",
    "needs_retrain",
    "new_flat",
    "new_ivf",
    "nlist_for",
    "plan_index",
    "plan_of",
    "read_index",
    "read_index_checksum",
    "recall_at_k",
    "refine",
    "search",
    "tune_nprobe",
    "write_index",
]

Kind = Literal["flat", "ivf", "ivf-sq8", "ivf-pq"]
COMPRESSED = ("ivf-sq8", "ivf-pq")
RERANK_FACTORS = (2, 4, 8, 16, 32)  # candidates re-scored exactly, as a multiple of k
MIN_COMPRESSED = 1024  # PQ trains 256 centroids per sub-quantizer: fewer vectors train it badly
TRAIN_COMPRESSED = 16_384  # training sample for compressed codes (PQ wants >= 39 x 256 points)
Fetch = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # ids -> (found ids, their vectors)
RETRAIN_FACTOR = 4
SAMPLE_PER_LIST = 32  # k-means training points per list: centroids only route queries, 32 is plenty
MIN_LISTS = 8
MIN_IVF = MIN_LISTS * SAMPLE_PER_LIST  # 256: fewer vectors cannot train even the smallest IVF index
KMEANS_ITERS = 10  # FAISS defaults to 25; IVF recall barely changes after 10 and training is 2.5x faster


@dataclass(frozen=True)
class AnnConfig:
    """When to switch from exact to approximate search, and how hard to tune it.

    Attributes:
        ann_threshold: collections with at least this many images get an IVF index.
        recall_target: the recall@10 vs exact search that tuning must guarantee.
        tune_margin: tuned on sample queries to `recall_target + tune_margin`, so unseen queries
            keep the target.
        tune_queries: stored vectors used as tuning queries.
        seed: for the training sample and the tuning queries.
        max_memory: bytes the searchable index may hold in memory; None: no limit (exact or IVF-Flat).
    """

    ann_threshold: int = 50_000
    recall_target: float = 0.95
    tune_margin: float = 0.02
    tune_queries: int = 256
    seed: int = 0
    max_memory: int | None = None

    def __post_init__(self) -> None:
        if self.max_memory is not None and (isinstance(self.max_memory, bool) or not isinstance(self.max_memory, int)
                                            or self.max_memory < 1):
            raise ValueError(f"max_memory must be a positive number of bytes, got {self.max_memory!r}")
        if not isinstance(self.ann_threshold, int) or self.ann_threshold < 1:
            raise ValueError(f"ann_threshold must be a positive integer, got {self.ann_threshold!r}")
        if not 0 < self.recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {self.recall_target!r}")
        if not 0 <= self.tune_margin < 1:
            raise ValueError(f"tune_margin must be in [0, 1), got {self.tune_margin!r}")
        if not isinstance(self.tune_queries, int) or self.tune_queries < 1:
            raise ValueError(f"tune_queries must be a positive integer, got {self.tune_queries!r}")

    @property
    def tune_target(self) -> float:
        return min(1.0, self.recall_target + self.tune_margin)


def choose_kind(n: int, cfg: AnnConfig, current: Kind | None = None) -> Kind:
    """The index kind for `n` vectors: IVF from the threshold on (or half of it, for an existing IVF
    index), and never below `MIN_IVF` vectors, which is too few to train the smallest IVF index."""
    threshold = cfg.ann_threshold // 2 if current not in (None, "flat") else cfg.ann_threshold
    return "ivf" if n >= max(threshold, MIN_IVF) else "flat"


@dataclass(frozen=True)
class Plan:
    """An index to build: its kind, inverted lists and (IVF-PQ) code bytes per vector."""

    kind: Kind
    nlist: int = 0
    pq_m: int = 0

    def memory(self, n: int, dim: int) -> int:
        """Bytes the index takes in memory for n vectors (FAISS's own structures; estimates within ~10%)."""
        if self.kind == "flat":
            return n * (4 * dim + 8 + 32)  # vectors, ids, and IndexIDMap2's id -> slot hash map
        code = {"ivf": 4 * dim, "ivf-sq8": dim, "ivf-pq": self.pq_m}[self.kind]
        tables = 256 * dim * 4 if self.kind == "ivf-pq" else 8 * dim
        return n * (code + 8) + self.nlist * dim * 4 + tables

    def describe(self) -> str:
        return f"{self.kind} (m={self.pq_m})" if self.kind == "ivf-pq" else self.kind


def pq_sizes(dim: int) -> list[int]:
    """IVF-PQ code bytes to try, largest first: divisors of dim, 2 to 32 dimensions per byte."""
    return [m for m in range(dim // 2, 0, -1) if dim % m == 0 and 2 <= dim // m <= 32]


def plan_index(n: int, dim: int, cfg: AnnConfig, current: Kind | None = None, reserve: int = 0) -> Plan:
    """The index for `n` vectors: `choose_kind`'s without a memory budget; with one, the most accurate
    that fits in `cfg.max_memory - reserve` bytes (the smallest when none does)."""
    kind = choose_kind(n, cfg, current)
    nlist = nlist_for(n)
    plans = [Plan("flat") if kind == "flat" else Plan("ivf", nlist)]
    if cfg.max_memory is None:
        return plans[0]
    if n >= MIN_COMPRESSED:
        plans += [Plan("ivf-sq8", nlist), *(Plan("ivf-pq", nlist, m) for m in pq_sizes(dim))]
    budget = cfg.max_memory - reserve
    return next((p for p in plans if p.memory(n, dim) <= budget), plans[-1])


def nlist_for(n: int) -> int:
    """Power of two nearest 4 sqrt(n) (FAISS's guideline is 4-16 sqrt(n)), with >= 32 vectors a list
    (at least 8 lists: `choose_kind` picks IVF only from `MIN_IVF` = 8 x 32 vectors on)."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    while nlist > MIN_LISTS and nlist * SAMPLE_PER_LIST > n:
        nlist //= 2
    return int(min(max(nlist, MIN_LISTS), 65536))


def needs_retrain(trained_n: int, n: int) -> bool:
    return n > RETRAIN_FACTOR * trained_n or n * RETRAIN_FACTOR < trained_n


def new_flat(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def new_ivf(sample: np.ndarray, nlist: int, seed: int = 0, kind: Kind = "ivf", pq_m: int = 0) -> faiss.IndexIVF:
    """An empty IVF index (`kind` says how it stores vectors) trained on `sample` (M, D)."""
    dim = sample.shape[1]
    quantizer = faiss.IndexFlatIP(dim)
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
    elif kind == "ivf-sq8":
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, ip)
    elif kind == "ivf-pq":
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, 8, ip)
        index.pq.cp.seed = seed
        index.pq.cp.niter = KMEANS_ITERS
        index.pq.cp.min_points_per_centroid = 1  # our sample is what it is; no warning on stderr
    else:
        raise ValueError(f"not an IVF kind: {kind!r}")
    index.cp.seed = seed
    index.cp.niter = KMEANS_ITERS
    index.cp.max_points_per_centroid = SAMPLE_PER_LIST
    index.cp.min_points_per_centroid = min(16, SAMPLE_PER_LIST)  # silences FAISS's warning for 32/list
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.own_fields = True
    quantizer.this.disown()  # the IVF index owns and frees its quantizer from here on
    return index


def index_kind(index: faiss.Index) -> Kind:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivf-pq"
    if isinstance(index, faiss.IndexIVFScalarQuantizer):
        return "ivf-sq8"
    return "ivf" if isinstance(index, faiss.IndexIVF) else "flat"


def plan_of(index: faiss.Index) -> Plan:
    kind = index_kind(index)
    if kind == "flat":
        return Plan("flat")
    ivf = faiss.extract_index_ivf(index)
    return Plan(kind, int(ivf.nlist), int(faiss.downcast_index(index).pq.M) if kind == "ivf-pq" else 0)


def search(index: faiss.Index, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
           nprobe: int | None = None, excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(B, D) queries -> scores (B, k), ids (B, k); missing slots have id -1 (and score -inf).

    `allowed` restricts results to those ids; otherwise `excluded` (e.g. entries deleted since the index
    was written) leaves those out. On IVF, nprobe is scaled by 1 / (allowed fraction) so that the number
    of allowed candidates scanned stays what tuning measured; a selective filter thus degrades to an
    exhaustive (exact) scan of the inverted lists instead of losing recall.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not index.ntotal:
        return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    ivf = faiss.extract_index_ivf(index) if index_kind(index) != "flat" else None
    if allowed is not None:
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
    elif excluded is not None and len(excluded):
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.ascontiguousarray(excluded, dtype=np.int64)))
    else:
        sel = None
    if ivf is not None:
        probe = nprobe or ivf.nprobe
        if allowed is not None and index.ntotal:
            fraction = max(len(allowed) / index.ntotal, 1e-9)
            probe = math.ceil(probe / fraction)
        params = faiss.SearchParametersIVF(sel=sel, nprobe=int(min(probe, ivf.nlist)))
    else:
        params = faiss.SearchParameters(sel=sel) if sel is not None else None
    scores, ids = index.search(queries, k, params=params)
    scores[ids < 0] = -np.inf
    return scores, ids


def refine(queries: np.ndarray, ids: np.ndarray, fetch: Fetch, k: int,
           chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidate `ids` (B, K) exactly against their full vectors; the top k of each row.

    `fetch(unique ids)` returns the ids it found and their vectors (an id gone meanwhile is dropped).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    found, vecs = fetch(np.unique(ids[ids >= 0]))
    order = np.argsort(found)
    found, vecs = found[order], vecs[order]
    out_s = np.full((len(ids), k), -np.inf, np.float32)
    out_i = np.full((len(ids), k), -1, np.int64)
    if not len(found):
        return out_s, out_i
    for lo in range(0, len(ids), chunk):  # (b, K, D) at a time bounds the gather
        cand = ids[lo : lo + chunk]
        pos = np.clip(np.searchsorted(found, cand), 0, len(found) - 1)
        ok = (cand >= 0) & (found[pos] == cand)
        scores = np.einsum("bd,bkd->bk", queries[lo : lo + chunk], vecs[pos])  # (b, D) x (b, K, D) -> (b, K)
        scores[~ok] = -np.inf
        s, i = merge_topk([(scores, np.where(ok, cand, -1))], k)
        out_s[lo : lo + chunk], out_i[lo : lo + chunk] = s, i
    return out_s, out_i


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k of several (scores (B, *), ids (B, *)) result sets by score; empty slots (-inf, -1) last."""
    s = np.concatenate([p[0] for p in parts], axis=1)
    i = np.concatenate([p[1] for p in parts], axis=1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    if s.shape[1] < k:
        pad = k - s.shape[1]
        s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
        i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
    i[~np.isfinite(s)] = -1
    return s, i


def exact_knn(queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]],
              k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner product of (B, D) queries over streamed `(ids, vectors)` chunks."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    b = len(queries)
    best_s = np.full((b, 0), -np.inf, np.float32)
    best_i = np.full((b, 0), -1, np.int64)
    for ids, vecs in chunks:
        scores = queries @ vecs.T  # (B, D) @ (D, n) -> (B, n)
        s = np.concatenate([best_s, scores], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(ids, scores.shape)], axis=1)
        if s.shape[1] > k:
            top = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s, i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
        best_s, best_i = s, i
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def recall_at_k(approx_scores: np.ndarray, approx_ids: np.ndarray, exact_scores: np.ndarray,
                k: int, exclude: np.ndarray | None = None, eps: float = 1e-5) -> float:
    """Mean fraction of the top k that reach the k-th exact score (ann-benchmarks' definition).

    `exclude` (B,) drops one id per query from both lists (a query that is itself in the index).
    """
    hits, total = 0, 0
    for row in range(len(approx_ids)):
        keep_a = approx_ids[row] >= 0
        keep_e = np.isfinite(exact_scores[row])
        if exclude is not None:
            keep_a &= approx_ids[row] != exclude[row]
        a = approx_scores[row][keep_a][:k]
        e = exact_scores[row][keep_e]
        if exclude is not None:
            e = e[1:]  # the query's own vector is its best match
        e = e[:k]
        if not len(e):
            continue
        hits += int(np.sum(a >= e[-1] - eps))
        total += len(e)
    return hits / total if total else 1.0


def tune_nprobe(index: faiss.Index, query_sets: list[tuple[np.ndarray, np.ndarray | None]],
                chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], target: float,
                k: int = 10, fetch: Fetch | None = None) -> tuple[int, int, float]:
    """Smallest power-of-two nprobe at which every query set reaches `target` recall@k; sets it on `index`.

    Each set is `(queries (B, D), ids)`: `ids` names each query's own vector when the queries are
    stored vectors (left out of the recall), else None. With `fetch` (compressed codes), candidates are
    re-scored exactly (`refine`): the smallest factor of `RERANK_FACTORS` that reaches the target
    within nprobe <= nlist wins. Returns (nprobe, rerank factor or 0, the lowest set's recall).
    """
    ivf = faiss.extract_index_ivf(index)
    sets = [(q, ids, exact_knn(q, chunks(), k + 1)[0]) for q, ids in query_sets if len(q)]

    def recall(nprobe: int, rerank: int) -> float:
        worst = 1.0
        for q, ids, exact in sets:
            if rerank:
                _, cand = search(index, q, (k + 1) * rerank, nprobe=nprobe)
                got = refine(q, cand, fetch, k + 1)
            else:
                got = search(index, q, k + 1, nprobe=nprobe)
            worst = min(worst, recall_at_k(*got, exact, k, exclude=ids))
        return worst

    best = None
    for rerank in RERANK_FACTORS if fetch is not None else (0,):
        nprobe = 1
        while True:
            r = recall(nprobe, rerank)
            if r >= target or nprobe >= ivf.nlist:
                break
            nprobe = min(nprobe * 2, ivf.nlist)
        if best is None or r > best[2]:
            best = (nprobe, rerank, r)
        if r >= target:
            best = (nprobe, rerank, r)
            break
    ivf.nprobe = best[0]
    return best


def write_index(index: faiss.Index, path) -> str:
    """Atomically: temp file, fsync, rename. Streams through a callback, so no in-memory copy.

    Returns the file's checksum (`read_index_checksum` computes the same while reading).
    """
    crc = 0

    def write(data: bytes) -> int:
        nonlocal crc
        crc = zlib.crc32(data, crc)
        return f.write(data)

    with atomic_write(path) as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(write))
    return f"{crc:08x}"


def read_index(path) -> faiss.Index:
    return faiss.read_index(str(path))


def read_index_checksum(path) -> tuple[faiss.Index, str]:
    """Read a FAISS file and its checksum (CRC-32 of every byte, as `write_index` returns) in one pass.

    CRC-32 because it only has to tell this index's file from a damaged one or another index's,
    and it runs at disk speed. Raises FileNotFoundError, or RuntimeError for a file FAISS cannot parse.
    """
    crc = 0
    with open(path, "rb") as f:
        def read(n: int) -> bytes:
            nonlocal crc
            data = f.read(n)
            crc = zlib.crc32(data, crc)
            return data

        index = faiss.read_index(faiss.PyCallbackIOReader(read))
        while data := f.read(1 << 20):  # bytes after the index still count
            crc = zlib.crc32(data, crc)
    return index, f"{crc:08x}"


def id_range(index: faiss.Index) -> tuple[int, int] | None:
    """(smallest, largest) id stored in a flat id map or an IVF index; None when empty."""
    if not index.ntotal:
        return None
    if index_kind(index) == "flat":
        ids = faiss.vector_to_array(faiss.downcast_index(index).id_map)
        return int(ids.min()), int(ids.max())
    invlists = faiss.extract_index_ivf(index).invlists
    lo, hi = None, None
    for lst in range(invlists.nlist):
        n = invlists.list_size(lst)
        if n:
            ids = faiss.rev_swig_ptr(invlists.get_ids(lst), n)
            lo = int(ids.min()) if lo is None else min(lo, int(ids.min()))
            hi = int(ids.max()) if hi is None else max(hi, int(ids.max()))
    return lo, hi
