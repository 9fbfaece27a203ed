"""Scale-out benchmark: `fsclip embed` runners, and the vector stores at a million vectors.

    python -m eval.bench_scale [--images 512] [--model vit-b-32] [--repeats 3] [--n 1000000] [--dim 512] [--quick]

Prints Markdown tables measured in this one run:

1. images/s of `fsclip embed --runner local` and `--runner ray` on the same JPEGs (3000x2000, so decoding
   costs what it does on photos) with the same model, and their ratio: the overhead (or gain) of handing
   the work to Ray on one machine. Each runner runs in its own fresh process (Ray's local cluster is
   started there once, outside the timings, sized to the machine), is warmed up on a small set, then
   embeds the whole set `--repeats` times into fresh output folders (median, with the range). The
   process reports its own peak memory (VmHWM); for Ray that is the driver's, not the workers'.
   The default model is the ViT-B-32 architecture with random weights, saved once to a folder so that
   every Ray worker loads the same weights (the runner checks the fingerprint).
2. Bytes per image of the Parquet shards, float32 and float16, for 512- and 768-d embeddings (not a timing).
3. Milvus Lite vs FAISS flat / IVF at `--n` x `--dim` synthetic embedding-like vectors (the mixture of
   eval/bench_search.py), each built the way `fsclip index build --from-embeddings` builds it and searched
   through `ImageIndex.search_vectors` (what `fsclip search` and the service run: the engine plus its
   metadata lookups): load time, recall@10 against exact search on held-out image-like and text-like
   queries, single-query QPS (median of --repeats). The IVF indexes are tuned as fsclip tunes them, with
   text-like queries standing in for the model's text embeddings (synthetic data has no model).
4. The cost of an update of 100 changed files at `--n` vectors (FAISS store, loaded from shards: the
   index's share of the work, no model): the O(k) publish, what a publish cost before (reading and
   rewriting the whole FAISS file), a full rebuild, a reader moving to the new generation, and the
   amortised merge (a merge every 5% of the collection changed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from eval._timing import Timing, isolated_cache, markdown_table, measure

# One runner's measurement, in a fresh process: argv = runner, model, image folder, work folder, repeats.
_CHILD = textwrap.dedent("""
    import json, os, sys, time
    from eval._timing import peak_rss_mib
    from fsclip.embed import embed
    runner, model, images, work, repeats = sys.argv[1:6]
    if runner == "ray":
        import ray
        ray.init(include_dashboard=False, log_to_driver=False)  # a local cluster sized to the machine
    files = sorted(os.listdir(images))
    warm = os.path.join(work, "warm.txt")
    with open(warm, "w") as f:
        f.write("\\n".join(os.path.join(images, x) for x in files[:32]))
    opts = dict(runner=runner, model=model, device="cpu", shard_size=256, batch_size=32)
    embed([warm], os.path.join(work, "warm"), **opts)
    seconds = []
    for r in range(int(repeats)):
        t0 = time.perf_counter()
        report = embed([images], os.path.join(work, f"run{r}"), **opts)
        seconds.append(time.perf_counter() - t0)
        assert report.rows == len(files), report
    print("RESULT " + json.dumps({"seconds": seconds, "peak_mib": peak_rss_mib()}), flush=True)
""")


def _vit_b_32(folder: Path) -> str:
    """ViT-B-32 with random weights in open_clip's local-dir layout (identical weights in every process)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    cfg = {"model_cfg": open_clip.get_model_config("ViT-B-32"),
           "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    return str(folder)


def _run_child(runner: str, model: str, images: Path, work: Path, repeats: int) -> dict:
    work.mkdir()
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run([sys.executable, "-c", _CHILD, runner, model, str(images), str(work), str(repeats)],
                          capture_output=True, text=True, check=False, env=env,
                          cwd=Path(__file__).resolve().parents[1])  # where `eval` imports from
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{runner} runner failed: {proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def bench_runners(n_images: int, model: str, repeats: int) -> list[list]:
    from eval.bench_encode import _write_jpegs

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        _write_jpegs(tmp / "images", n_images)
        label = model
        if model == "vit-b-32":
            (tmp / "model").mkdir()
            model, label = _vit_b_32(tmp / "model"), "ViT-B-32 (random weights)"
        # local first, then ray, each in its own process: neither inherits the other's warm caches
        results = {runner: _run_child(runner, model, tmp / "images", tmp / runner, repeats)
                   for runner in ("local", "ray")}
    t = {runner: Timing(tuple(r["seconds"])) for runner, r in results.items()}
    what = f"{n_images} JPEGs 3000x2000, {label}, CPU"
    return [[what, t["ray"].rate(n_images, " img/s"), "local runner", t["local"].rate(n_images, " img/s"),
             f"**{t['local'].median / t['ray'].median:.2f}x**",
             f"driver peak RSS {results['ray']['peak_mib']:.0f} MiB (local {results['local']['peak_mib']:.0f} MiB); "
             f"median of {repeats}; {os.cpu_count()} CPUs"]]


def bench_storage(rows: int = 10_000, dims: tuple[int, ...] = (512, 768)) -> list[list]:
    """Bytes per image of `fsclip embed`'s Parquet shards (not a timing): `rows` rows of random unit
    vectors with paths like `/data/photos/2023/06/IMG_001234.jpg`, as `fsclip embed` writes them."""
    import numpy as np

    from fsclip.embed import ImageMeta, ShardResult, shard_bytes

    rng = np.random.default_rng(0)
    paths = [f"/data/photos/{2010 + i % 14}/{1 + i % 12:02d}/IMG_{i:06d}.jpg" for i in range(rows)]
    metas = [ImageMeta(f"{rng.integers(2**63):016x}{rng.integers(2**63):016x}", int(rng.integers(1e5, 1e7)),
                       1_700_000_000_000_000_000 + i, 4032, 3024) for i in range(rows)]
    out = []
    for dim in dims:
        emb = rng.standard_normal((rows, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        result = ShardResult(0, paths, metas, emb, [])
        full = len(shard_bytes(result, dim, "float32")) / rows
        half = len(shard_bytes(result, dim, "float16")) / rows
        out.append([f"dim {dim}, {rows:,} rows", f"{full:.0f}", f"{half:.0f}", f"{4 * dim} / {2 * dim}",
                    f"{half / full:.2f}x"])
    return out


def _synthetic(n: int, dim: int):
    from eval.bench_search import synthetic_embeddings

    return synthetic_embeddings(n, dim, seed=0, clusters=max(8, n // 100))


def _shards(folder: Path, vecs, record: dict, changed: int = 0) -> Path:
    """An `fsclip embed` output folder of `vecs` (paths /synthetic/NNNNNNN.jpg); the first `changed` rows get
    another content hash, as files whose content changed."""
    import hashlib

    import numpy as np

    from fsclip.embed import FORMAT, FORMAT_VERSION, ImageMeta, ShardResult, shard_bytes

    (folder / "shards").mkdir(parents=True)
    n, shard = len(vecs), 100_000
    shards = []
    for s, lo in enumerate(range(0, n, shard)):
        hi = min(n, lo + shard)
        metas = [ImageMeta(hashlib.blake2b(f"{i}-{int(i < changed)}".encode(), digest_size=16).hexdigest(), 10_000 + i,
                           1_700_000_000_000_000_000 + i + (i < changed), 640, 480) for i in range(lo, hi)]
        data = shard_bytes(ShardResult(s, [f"/synthetic/{i:07d}.jpg" for i in range(lo, hi)], metas,
                                       np.ascontiguousarray(vecs[lo:hi]), []), vecs.shape[1])
        name = f"shards/part-{s:05d}.parquet"
        (folder / name).write_bytes(data)
        shards.append({"shard": s, "file": name, "rows": hi - lo, "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
    (folder / "manifest.json").write_text(json.dumps({
        "format": FORMAT, "format_version": FORMAT_VERSION, "status": "complete", "model": record,
        "dtype": "float32", "shard_size": shard, "inputs": {"count": n, "sha256": "-"}, "rows": n,
        "shards": shards, "failed": []}))
    return folder


def _record(dim: int) -> dict:
    return {"spec": "synthetic", "backend": "none", "fingerprint": f"synthetic-{dim}", "dim": dim,
            "compute_dtype": "float32", "runtime": "torch"}


def _built(location: str, shards: Path, dim: int, text_tuning, **ann):
    """An index at `location` loaded from `shards`, tuned with `text_tuning` as its text queries. Returns
    (index, seconds)."""
    from fsclip.search import AnnConfig, ImageIndex

    t0 = time.perf_counter()
    index = ImageIndex.create(location, _record(dim), ann=AnnConfig(**ann))
    index.encode_text = lambda texts: text_tuning  # no model behind synthetic vectors
    index.load_embeddings(shards)
    return index, time.perf_counter() - t0


def bench_stores(n: int, dim: int, n_queries: int, repeats: int, milvus: bool = True) -> list[list]:
    """Milvus Lite vs FAISS flat / IVF through `ImageIndex` (see the module doc, item 3)."""
    import numpy as np

    from eval.bench_search import synthetic_embeddings, text_like
    from fsclip.search import faiss_index as fi

    data = _synthetic(n, dim)
    clusters = max(8, n // 100)
    queries = {"image": synthetic_embeddings(n_queries, dim, 1, clusters),
               "text": text_like(synthetic_embeddings(n_queries, dim, 2, clusters), seed=3)}
    tuning = text_like(synthetic_embeddings(256, dim, 4, clusters), seed=5)
    ids = np.arange(1, n + 1, dtype=np.int64)  # the catalog numbers rows 1..n in shard order
    exact = {kind: fi.exact_knn(q, ((ids[i : i + 65536], data[i : i + 65536]) for i in range(0, n, 65536)), 10)[0]
             for kind, q in queries.items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = _shards(tmp / "emb", data, _record(dim))
        del data
        ivf = {"ann_threshold": min(50_000, n // 2)}  # the default threshold, or half of a --quick collection
        setups = [("FAISS flat (exact)", "flat.idx", {"ann_threshold": 10**12}), ("FAISS IVF-Flat", "ivf.idx", ivf)]
        if milvus:
            setups += [("Milvus Lite FLAT (exact)", "flat.db", {"ann_threshold": 10**12}),
                       ("Milvus Lite IVF_FLAT", "ivf.db", ivf)]
        for label, name, ann in setups:
            index, seconds = _built(str(tmp / name), shards, dim, tuning, **ann)
            recall = {}
            for kind, q in queries.items():
                hits = index.search_vectors(q, k=10)
                s = np.array([[h.score for h in hs] + [-np.inf] * (10 - len(hs)) for hs in hits], np.float32)
                i = np.array([[h.id for h in hs] + [-1] * (10 - len(hs)) for hs in hits], np.int64)
                recall[kind] = fi.recall_at_k(s, i, exact[kind], 10)
            single = queries["image"][: min(100, n_queries)]
            timing = measure(lambda index=index, single=single: [index.search_vectors(q[None], k=10) for q in single],
                             repeats)
            info = index.info()["index"]
            setting = (f"nlist {info['nlist']}, nprobe {info['nprobe']}" if info["kind"] != "flat" else "exact")
            rows.append([label, setting, f"{seconds:.0f}", f"{recall['image']:.3f}", f"{recall['text']:.3f}",
                         timing.rate(len(single), " q/s"), f"{1000 * timing.median / len(single):.1f}"])
            index.close()
    return rows


def bench_update_cost(n: int, dim: int, changed: int, repeats: int) -> list[list]:
    """An update of `changed` files at `n` vectors vs a full rebuild (see the module doc, item 4)."""
    import shutil

    from eval.bench_search import text_like
    from fsclip.search import ImageIndex, catalog
    from fsclip.search import faiss_index as fi
    from fsclip.search.stores import faiss as faiss_store

    data = _synthetic(n, dim)
    tuning = text_like(_synthetic(256, dim), seed=5)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full = _shards(tmp / "emb", data, _record(dim))
        update = _shards(tmp / "upd", data[:changed], _record(dim), changed=changed)
        del data
        index, rebuild = _built(str(tmp / "p.idx"), full, dim, tuning)
        kind = index.kind
        index.close()
        upd, old, refresh = [], [], []
        for r in range(repeats):
            work = tmp / f"run{r}.idx"
            shutil.copytree(tmp / "p.idx", work)
            reader = ImageIndex.open(work)
            reader.snapshot()
            writer = ImageIndex.open(work)
            t0 = time.perf_counter()
            report = writer.load_embeddings(update)
            upd.append(time.perf_counter() - t0)
            assert report.loaded == changed and report.total == n, report
            t0 = time.perf_counter()
            reader.snapshot()
            refresh.append(time.perf_counter() - t0)
            # before: every publish read the whole FAISS file and wrote it again
            con = writer.store.catalog()
            t0 = time.perf_counter()
            base = faiss_store.read_base(work, con, catalog.read_info(con))
            fi.write_index(base, work / "rewrite.faiss")
            old.append(time.perf_counter() - t0)
            reader.close()
            writer.close()
            shutil.rmtree(work)
    u, o, f = Timing(tuple(upd)), Timing(tuple(old)), Timing(tuple(refresh))
    merges_per = max(1, int(faiss_store.MERGE_FRACTION * n) // (2 * changed))  # a changed file: one removal + one add
    what = f"{changed} of {n:,} x {dim} ({kind})"
    return [[what, "update (O(k) publish)", u.time(), f"**{100 * u.median / rebuild:.2f}%**"],
            [what, "reader moves to it", f.time(), f"{100 * f.median / rebuild:.2f}%"],
            [what, "publish before (read + rewrite the FAISS file)", o.time(), f"{100 * o.median / rebuild:.1f}%"],
            [what, f"merge, amortised (one per {merges_per} such updates)", f"{o.median / merges_per:.3f} s",
             f"{100 * o.median / merges_per / rebuild:.2f}%"],
            [what, "full rebuild (create + load all shards)", f"{rebuild:.1f} s", "100%"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512, help="JPEGs to embed per run (default: 512)")
    p.add_argument("--model", default="vit-b-32",
                   help="model spec, or vit-b-32: the architecture with random weights (default)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per runner (median, range)")
    p.add_argument("--n", type=int, default=1_000_000, help="vectors for the store rows (default: 1,000,000)")
    p.add_argument("--dim", type=int, default=512, help="their dimension (default: 512)")
    p.add_argument("--queries", type=int, default=500, help="held-out queries of each kind (default: 500)")
    p.add_argument("--quick", action="store_true",
                   help="64 images, the shapes model, 20,000 x 64 vectors, one run: checks that it runs")
    parts = ["runners", "storage", "stores", "update"]
    p.add_argument("--parts", nargs="+", choices=parts, default=parts, help="what to measure (default: all)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.model, args.repeats, args.n, args.dim, args.queries = 64, "shapes", 1, 20_000, 64, 100
    t0 = time.perf_counter()
    with isolated_cache():
        if "runners" in args.parts:
            print("## fsclip embed: Ray runner vs local runner (one machine)\n")
            print(markdown_table(["workload", "ray runner", "baseline", "baseline rate", "ratio vs local", "note"],
                                 bench_runners(args.images, args.model, args.repeats)))
        if "storage" in args.parts:
            print("\n## Parquet bytes per image written by fsclip embed (zstd; not a timing)\n")
            print(markdown_table(["shard", "float32", "float16 (--fp16)", "embedding alone fp32 / fp16",
                                  "fp16 vs fp32"], bench_storage(2_000 if args.quick else 10_000)))
        if "stores" in args.parts:
            import importlib.util

            milvus = all(importlib.util.find_spec(m) for m in ("pymilvus", "milvus_lite"))
            print(f"\n## Milvus Lite vs FAISS at {args.n:,} x {args.dim} (through ImageIndex.search_vectors)\n")
            if not milvus:
                print("(Milvus Lite not installed: pip install 'fsclip[milvus]'; FAISS rows only)\n")
            print(markdown_table(["store", "setting", "load s", "recall@10 image", "recall@10 text", "single query",
                                  "ms / query"], bench_stores(args.n, args.dim, args.queries, args.repeats, milvus)))
        if "update" in args.parts:
            print(f"\n## Index update cost: 100 changed files at {args.n:,} vectors vs a full rebuild\n")
            print(markdown_table(["workload", "step", "seconds", "vs full rebuild (target: update < 5%)"],
                                 bench_update_cost(args.n, args.dim, 100, args.repeats)))
    print(f"\n(total {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} at the end)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
