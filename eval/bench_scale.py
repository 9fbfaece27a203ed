"""Scale-out benchmark: `fsclip embed` with the Ray runner vs the local runner on this machine.

    python -m eval.bench_scale [--images 512] [--model vit-b-32] [--repeats 3] [--quick]

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
3. Placeholders for the rows that the vector-store work adds (issue 12, part 2): Milvus Lite vs FAISS
   flat/IVF recall@10 and QPS at 1M x 512, and the cost of updating 100 files at 1M vectors vs a rebuild.
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

from eval._timing import Timing, isolated_cache, markdown_table

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


def bench_milvus() -> str | None:
    """Milvus Lite vs FAISS flat/IVF: recall@10 and QPS at 1M x 512 (added with the Milvus store)."""
    return None


def bench_update_cost() -> str | None:
    """Seconds to update 100 changed files at 1M vectors vs a full rebuild (target < 5%; added with delta
    publishing)."""
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512, help="JPEGs to embed per run (default: 512)")
    p.add_argument("--model", default="vit-b-32",
                   help="model spec, or vit-b-32: the architecture with random weights (default)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per runner (median, range)")
    p.add_argument("--quick", action="store_true", help="64 images, the shapes model, one run: checks that it runs")
    p.add_argument("--parts", nargs="+", choices=["runners", "storage"], default=["runners", "storage"],
                   help="what to measure (default: both)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.model, args.repeats = 64, "shapes", 1
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
        for title, part in (("Milvus Lite vs FAISS at 1M x 512", bench_milvus()),
                            ("Index update cost, 100 files at 1M vectors", bench_update_cost())):
            print(f"\n## {title}\n\n{part}" if part else f"\n{title}: not measured yet (issue 12, part 2)")
    print(f"\n(total {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} at the end)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
