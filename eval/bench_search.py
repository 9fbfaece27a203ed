"""Search benchmark: exact (flat) vs approximate (IVF) FAISS search, and peak memory of `fsclip index build`.

    python -m eval.bench_search [--n 1000000] [--dim 512] [--queries 1000] [--rss-sizes 2000 20000] [--quick]

Prints Markdown tables measured in this one run:

1. Flat vs IVF on synthetic unit vectors shaped like image embeddings: a mixture of n/100 components
   (random unit centres), each spread along its own 16-dimensional subspace (offset norm 0.5-1.5)
   plus isotropic noise of norm 0.2 (low intrinsic dimension, as CLIP features have). IVF is built
   exactly as an index builds it (fsclip.search.faiss_index: nlist rule, k-means sample, nprobe tuned to
   recall@10 >= 0.97 on 256 stored vectors *and* 256 text-like queries). Held-out queries of both kinds:
   image-like ones are fresh draws from the mixture; text-like ones are such draws moved along one shared
   direction (CLIP's modality gap: text embeddings sit in their own cone) with extra noise, so that their
   best match has cosine ~0.28, as text-to-image matches have in CLIP ViT-B/32 (image-to-image ~0.8); they
   need several times the nprobe of image queries. Reported: build time, bytes per vector (serialized
   index), queries/s one at a time and in one batch (median of --repeats, with the range), recall@10 of
   each query kind against exact search. A smaller uniform-random row shows the worst case (no structure:
   no ANN method can skip much of the data there).
2. Peak RSS of `fsclip index build` (a fresh process per run, VmHWM read by that process itself;
   median of --repeats) on small images, at two collection sizes: streaming keeps it nearly flat.

Every run uses a fresh, empty FSCLIP_CACHE.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from eval._timing import Timing, isolated_cache, markdown_table, measure
from fsclip.search import faiss_index as fi


def synthetic_embeddings(n: int, dim: int, seed: int, clusters: int, rank: int = 16,
                         chunk: int = 8192) -> np.ndarray:
    """Unit vectors shaped like image embeddings, drawn `chunk` at a time to bound temporary memory.

    A mixture of `clusters` components (the benchmark uses one per 100 vectors) around random unit
    centres, each spread along its own `rank`-dimensional subspace (offset norm 0.5-1.5) plus
    isotropic noise of norm 0.2: low intrinsic dimension, like real CLIP features. The mixture is
    fixed (seed 12345); `seed` draws the points, so queries drawn with another seed come from the
    same distribution. The draw depends on `chunk` once `n` exceeds it.
    """
    fixed = np.random.default_rng(12345)
    centres = fixed.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = fixed.standard_normal((clusters, rank, dim), dtype=np.float32) / np.sqrt(rank * dim)
    spread = fixed.uniform(0.5, 1.5, clusters).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        comp = rng.integers(clusters, size=m)
        z = rng.standard_normal((m, rank), dtype=np.float32) * spread[comp, None]
        x = centres[comp] + 0.2 * rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
        x += np.einsum("mr,mrd->md", z, bases[comp])  # (m, rank) x (m, rank, dim) -> (m, dim)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def uniform_unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


TEXT_GAP, TEXT_NOISE = 2.5, 1.4  # best-match cosine 0.28 (image-like: 0.79) at 50,000 x 512, median of 300


def text_like(images: np.ndarray, seed: int) -> np.ndarray:
    """Image-like draws turned into text-like queries: moved along one shared direction (the modality gap)
    by `TEXT_GAP`, plus isotropic noise of norm `TEXT_NOISE`, renormalised."""
    n, dim = images.shape
    gap = np.random.default_rng(54321).standard_normal(dim).astype(np.float32)
    gap /= np.linalg.norm(gap)
    noise = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    q = images + TEXT_GAP * gap + TEXT_NOISE * noise
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _bytes(index: faiss.Index) -> int:
    total = [0]

    def count(b: bytes) -> int:
        total[0] += len(b)
        return len(b)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total[0]


def _qps(index, queries: np.ndarray, k: int, budget_s: float, repeats: int) -> tuple[Timing, int, Timing]:
    """(single-query timing and how many queries it ran, one-batch timing over all queries).

    The single-query count is what fits `budget_s / repeats` in a first, untimed pass (at least 10).
    """
    t0, n_single = time.perf_counter(), 0
    for q in queries:
        fi.search(index, q[None], k)
        n_single += 1
        if time.perf_counter() - t0 > budget_s / max(1, repeats) and n_single >= 10:
            break
    single = measure(lambda: [fi.search(index, q[None], k) for q in queries[:n_single]], repeats, warmup=0)
    batched = measure(lambda: fi.search(index, queries, k), repeats, warmup=1)
    return single, n_single, batched


def bench_ann(n: int, dim: int, n_queries: int, uniform: bool, budget_s: float, repeats: int) -> list[list]:
    make = (lambda m, seed: uniform_unit(m, dim, seed)) if uniform else (
        lambda m, seed: synthetic_embeddings(m, dim, seed, clusters=max(8, n // 100)))
    data = make(n, 0)
    queries = {"image": make(n_queries, 1), "text": text_like(make(n_queries, 2), seed=3)}
    ids = np.arange(n, dtype=np.int64)
    label = f"{'uniform random' if uniform else 'embedding-like'} {n:,} x {dim}"

    t0 = time.perf_counter()
    flat = fi.new_flat(dim)
    for s in range(0, n, 100_000):
        flat.add_with_ids(data[s : s + 100_000], ids[s : s + 100_000])
    flat_build = time.perf_counter() - t0
    exact = {kind: fi.search(flat, q, 10)[0] for kind, q in queries.items()}  # ground truth
    flat_single, flat_n, flat_batched = _qps(flat, queries["image"][:200], 10, budget_s, repeats)
    flat_bytes = _bytes(flat) / n
    rows = [[label, "flat (exact)", f"{flat_build:.1f}", f"{flat_bytes:.0f}", flat_single.rate(flat_n, ""),
             flat_batched.rate(n_queries, ""), "1.000", "1.000", "1x / 1x"]]
    del flat

    t0 = time.perf_counter()
    nlist = fi.nlist_for(n)
    rng = np.random.default_rng(0)
    sample = data[np.sort(rng.choice(n, min(n, fi.SAMPLE_PER_LIST * nlist), replace=False))]
    ivf = fi.new_ivf(sample, nlist)
    for s in range(0, n, 100_000):
        ivf.add_with_ids(data[s : s + 100_000], ids[s : s + 100_000])
    tq = np.sort(rng.choice(n, 256, replace=False))
    tune_sets = [(data[tq], ids[tq]), (text_like(make(256, 4), seed=5), None)]  # as the index tunes: both kinds
    nprobe, _, _ = fi.tune_nprobe(ivf, tune_sets, lambda: [(ids, data)], fi.AnnConfig().tune_target)
    ivf_build = time.perf_counter() - t0
    ivf_bytes = _bytes(ivf) / n
    for probe in sorted({max(1, nprobe // 2), nprobe, min(nlist, nprobe * 2)}):
        faiss.extract_index_ivf(ivf).nprobe = probe
        single, n_single, batched = _qps(ivf, queries["image"], 10, budget_s, repeats)
        recall = {kind: fi.recall_at_k(*fi.search(ivf, q, 10), exact[kind], 10) for kind, q in queries.items()}
        tag = "tuned" if probe == nprobe else "for comparison"
        speedup = (flat_single.median / flat_n) / (single.median / n_single)
        rows.append([label, f"IVF{nlist} nprobe {probe} ({tag})", f"{ivf_build:.1f}" if probe == nprobe else "",
                     f"{ivf_bytes:.0f}", single.rate(n_single, ""), batched.rate(n_queries, ""),
                     f"{recall['image']:.3f}", f"{recall['text']:.3f}",
                     f"**{speedup:.0f}x** / {flat_batched.median / batched.median:.1f}x"])
    return rows


# -- peak RSS of index builds

def _write_images(root: Path, n: int, per_folder: int = 2000) -> None:
    from fsclip.shapes.world import BASE_SHAPES, COLOURS, render

    combos = [(c, s) for c in COLOURS for s in BASE_SHAPES]
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"part{i // per_folder:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        c, s = combos[rng.integers(len(combos))]
        render(c, s, rng, size=64).save(folder / f"{i:06d}.png")


# The child reports its own peak (VmHWM; see eval._timing.peak_rss_mib for why not ru_maxrss).
_CHILD = """
import sys, time
from eval._timing import peak_rss_mib
from fsclip.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
seconds = time.perf_counter() - t0
print("RESULT", rc, peak_rss_mib(), seconds, file=sys.stderr)
"""


def _build_rss(paths: list[Path], model: str, idx: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one `fsclip index build` in a fresh process."""
    argv = [sys.executable, "-c", _CHILD, "index", "build", *map(str, paths), "--index", str(idx),
            "--model", model, "--device", "cpu", "--overwrite", "-q"]
    # passive OpenMP waits: on a busy machine, spinning threads starve each other (10-100x slower)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env,
                          cwd=Path(__file__).resolve().parents[1])  # where `eval` imports from
    line = next((x for x in proc.stderr.splitlines() if x.startswith("RESULT")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"index build failed: {proc.stderr[-2000:]}")
    _, rc, peak_mib, seconds = line.split()
    return float(peak_mib), float(seconds)


def bench_rss(sizes: list[int], repeats: int, model: str) -> list[list]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        per_folder = min(sizes)
        _write_images(root, max(sizes), per_folder)
        results = {}
        for n in sizes:
            parts = sorted(root.iterdir())[: n // per_folder]
            runs = [_build_rss(parts, model, Path(tmp) / f"i{n}.idx") for _ in range(repeats)]
            rss = Timing(tuple(r[0] for r in runs))  # MiB, not seconds: the same median and range
            secs = Timing(tuple(r[1] for r in runs))
            results[n] = rss.median
            disk = sum(f.stat().st_size for f in (Path(tmp) / f"i{n}.idx").iterdir())
            rows.append([f"{n:,}", rss.time("", digits=0), secs.rate(n, ""), f"{disk / n:.0f}",
                         f"{rss.median / results[min(sizes)]:.2f}x"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors (default: 1,000,000)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--uniform-n", type=int, default=100_000, help="size of the uniform worst-case row (0: skip)")
    p.add_argument("--single-budget", type=float, default=10.0, help="seconds per single-query QPS measurement")
    p.add_argument("--rss-sizes", type=int, nargs="*", default=[2000, 20000], help="collections for the RSS part")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement and builds per size (medians)")
    p.add_argument("--model", default="shapes", help="model for the RSS builds (default: shapes)")
    p.add_argument("--quick", action="store_true", help="small sizes, one run each: checks that it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.queries, args.uniform_n, args.single_budget = 20_000, 200, 0, 1.0
        args.rss_sizes, args.repeats = [200, 400], 1

    t0 = time.perf_counter()
    header = ["vectors", "index", "build s", "bytes/vector", "QPS 1 query", f"QPS batch of {args.queries}",
              "recall@10 image queries", "recall@10 text queries", "speed-up vs flat (1 query / batch)"]
    with isolated_cache():
        rows = bench_ann(args.n, args.dim, args.queries, uniform=False, budget_s=args.single_budget,
                         repeats=args.repeats)
        if args.uniform_n:
            rows += bench_ann(args.uniform_n, args.dim, args.queries, uniform=True, budget_s=args.single_budget / 2,
                              repeats=args.repeats)
        print("## Flat vs IVF (synthetic unit vectors)\n")
        print(markdown_table(header, rows))
        print(f"\n(faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {os.cpu_count()} CPUs; "
              f"QPS: median (slowest-fastest) of {args.repeats}; target: IVF recall@10 >= 0.95 on both query "
              "kinds at >= 10x the flat QPS)\n")
        if args.rss_sizes:
            print(f"## Peak RSS of `fsclip index build` ({args.model} model, 64x64 PNGs, median of {args.repeats})\n")
            print(markdown_table(["images", "peak RSS MiB", "img/s (whole command)", "index bytes/image",
                                  "peak RSS vs smallest"],
                                 bench_rss(sorted(args.rss_sizes), args.repeats, args.model)))
    print(f"\n(total {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} at the end)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
