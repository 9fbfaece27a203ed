"""FAISS layer: the index-choice rule, exact search vs torch.topk, ANN recall vs exact on synthetic vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from searchutil import synthetic_embeddings

from fsclip.search import faiss_index as fi
from fsclip.search.faiss_index import AnnConfig


def test_rule_flat_below_threshold_ivf_above_with_hysteresis():
    cfg = AnnConfig(ann_threshold=1000)
    assert fi.choose_kind(999, cfg) == "flat"
    assert fi.choose_kind(1000, cfg) == "ivf"
    assert fi.choose_kind(600, cfg, current="ivf") == "ivf"  # no flip-flopping around the threshold
    assert fi.choose_kind(499, cfg, current="ivf") == "flat"
    assert fi.nlist_for(50_000) == 1024  # 4 sqrt(50k) = 894
    assert fi.nlist_for(1_000_000) == 4096
    assert fi.nlist_for(300) == 8  # never fewer than 32 training vectors a list, at least 8 lists
    assert fi.needs_retrain(10_000, 40_001) and fi.needs_retrain(10_000, 2_499)
    assert not fi.needs_retrain(10_000, 39_000)


@pytest.mark.parametrize("bad", [dict(ann_threshold=0), dict(recall_target=1.5), dict(tune_queries=0),
                                 dict(tune_margin=-0.1)])
def test_ann_config_validates(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        AnnConfig(**bad)


def test_exact_knn_streamed_equals_torch_topk():
    x = synthetic_embeddings(3000, 32, seed=1, clusters=30)
    ids = np.arange(3000, dtype=np.int64) * 7 + 3
    q = synthetic_embeddings(20, 32, seed=2, clusters=30)
    chunks = [(ids[i : i + 700], x[i : i + 700]) for i in range(0, 3000, 700)]
    scores, got = fi.exact_knn(q, chunks, 10)
    ref = torch.topk(torch.from_numpy(q) @ torch.from_numpy(x).T, 10)
    np.testing.assert_array_equal(got, ids[ref.indices.numpy()])
    np.testing.assert_allclose(scores, ref.values.numpy(), rtol=1e-5, atol=1e-6)


def test_flat_search_equals_torch_topk_with_and_without_filter():
    x = synthetic_embeddings(5000, 48, seed=3, clusters=50)
    ids = np.arange(10, 5010, dtype=np.int64)
    index = fi.new_flat(48)
    index.add_with_ids(x, ids)
    q = synthetic_embeddings(16, 48, seed=4, clusters=50)
    s, i = fi.search(index, q, 10)
    ref = torch.topk(torch.from_numpy(q) @ torch.from_numpy(x).T, 10)
    np.testing.assert_array_equal(i, ids[ref.indices.numpy()])
    np.testing.assert_allclose(s, ref.values.numpy(), rtol=1e-5, atol=1e-6)

    allowed = ids[::37]
    s, i = fi.search(index, q, 10, allowed=allowed)
    sims = torch.from_numpy(q) @ torch.from_numpy(x[::37]).T
    ref = torch.topk(sims, 10)
    np.testing.assert_array_equal(i, allowed[ref.indices.numpy()])


def _ivf(x: np.ndarray, ids: np.ndarray, cfg: AnnConfig):
    nlist = fi.nlist_for(len(x))
    rng = np.random.default_rng(cfg.seed)
    index = fi.new_ivf(x[rng.choice(len(x), min(len(x), fi.SAMPLE_PER_LIST * nlist), replace=False)], nlist)
    index.add_with_ids(x, ids)
    tq = rng.choice(len(x), cfg.tune_queries, replace=False)
    nprobe, rerank, tuned = fi.tune_nprobe(index, [(x[tq], ids[tq])], lambda: [(ids, x)], cfg.tune_target)
    assert rerank == 0  # IVF-Flat scores are exact: nothing to re-rank
    return index, nlist, nprobe, tuned


def test_ivf_tuned_reaches_recall_target_on_held_out_queries():
    """The requirement: recall@10 vs exact >= 0.95 for queries the tuning never saw."""
    n, dim, clusters = 20_000, 64, 200
    x = synthetic_embeddings(n, dim, seed=5, clusters=clusters)
    ids = np.arange(n, dtype=np.int64) + 1
    cfg = AnnConfig(ann_threshold=10_000)
    index, nlist, nprobe, tuned = _ivf(x, ids, cfg)
    assert tuned >= cfg.tune_target
    # measured: nprobe 4 of 512 lists; a setting that scans most lists would not be ANN at all
    assert nprobe <= nlist // 16, f"nprobe {nprobe}/{nlist}: tuning should find a genuinely approximate setting"

    q = synthetic_embeddings(500, dim, seed=6, clusters=clusters)
    exact_s, _ = fi.exact_knn(q, [(ids, x)], 10)
    s, i = fi.search(index, q, 10)
    recall = fi.recall_at_k(s, i, exact_s, 10)
    assert recall >= 0.95, f"recall@10 {recall:.3f} at nprobe {nprobe}/{nlist}"

    # a filter scales nprobe by 1 / (fraction allowed), so filtered recall holds up too ...
    allowed = ids[::100]
    s, i = fi.search(index, q, 10, allowed=allowed)
    assert np.isin(i, allowed).all()
    exact_s, _ = fi.exact_knn(q, [(allowed, x[::100])], 10)
    assert fi.recall_at_k(s, i, exact_s, 10) >= 0.95
    # ... and a very selective one scans every list: exact
    allowed = ids[::1000]
    s, i = fi.search(index, q, 10, allowed=allowed)
    exact_s, exact_i = fi.exact_knn(q, [(allowed, x[::1000])], 10)
    np.testing.assert_array_equal(i, exact_i)

    # deletions through FAISS ids: removed ids never come back
    gone = ids[: n // 2]
    index.remove_ids(fi.faiss.IDSelectorBatch(gone))
    s, i = fi.search(index, q, 10)
    assert not np.isin(i, gone).any()
    exact_s, _ = fi.exact_knn(q, [(ids[n // 2 :], x[n // 2 :])], 10)
    assert fi.recall_at_k(s, i, exact_s, 10) >= 0.95


def test_recall_counts_ties_as_hits():
    exact = np.array([[0.9, 0.8, 0.8]], np.float32)
    approx_s = np.array([[0.9, 0.8, 0.8]], np.float32)
    approx_i = np.array([[1, 7, 9]])  # other ids than the exact run's, same scores: duplicates
    assert fi.recall_at_k(approx_s, approx_i, exact, 3) == 1.0
    assert fi.recall_at_k(np.array([[0.9, 0.8, 0.1]]), approx_i, exact, 3) == pytest.approx(2 / 3)


def test_write_read_roundtrip_is_atomic(tmp_path):
    index = fi.new_flat(8)
    index.add_with_ids(np.eye(8, dtype=np.float32), np.arange(8, dtype=np.int64) + 100)
    fi.write_index(index, tmp_path / "a.faiss")
    back = fi.read_index(tmp_path / "a.faiss")
    assert back.ntotal == 8 and fi.index_kind(back) == "flat"
    assert [p.name for p in tmp_path.iterdir()] == ["a.faiss"]  # no temp file left behind
