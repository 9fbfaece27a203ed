"""Few-shot fitting cost: frozen-feature heads on cached features, and a LoRA step on ViT-B-32.

    python -m eval.bench_fewshot [--classes 100] [--shots 16] [--lora-steps 4] [--quick]

Prints a Markdown table:
- linear probe, Tip-Adapter and Tip-Adapter-F fitted on cached features (synthetic: `classes` x `shots`
  training and 4 validation features per class, dimension 512), median of 3 fits after one warm-up;
- seconds per LoRA training step (both towers, rank 2, batch 32) for the ViT-B-32 architecture with
  random weights on the CPU, measured through `fsclip.adapters.fit` as the difference between two run
  lengths (so loading and set-up cancel out), with the peak resident memory of that process (VmHWM,
  read by the process itself); and the same for full fine-tuning of the image tower, for comparison.
  Each model run is a fresh process. Every run uses a fresh, empty FSCLIP_CACHE.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from eval._timing import isolated_cache, markdown_table, measure, peak_rss_mib

SPEC = "open_clip:ViT-B-32"  # architecture only: random weights, nothing downloaded


def synthetic_features(classes: int, shots: int, dim: int = 512, val_per_class: int = 4, seed: int = 0):
    """Clustered unit features with noisy 'text' centres: a task a linear probe can partly solve."""
    from fsclip.adapters._features import FeatureData

    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=-1)

    def draw(per_class: int):
        y = torch.arange(classes).repeat_interleave(per_class)
        x = centres[y] + 0.12 * torch.randn(len(y), dim, generator=g)
        return torch.nn.functional.normalize(x, dim=-1), y

    (x, y), (xv, yv) = draw(shots), draw(val_per_class)
    text = torch.nn.functional.normalize(centres + 0.12 * torch.randn(classes, dim, generator=g), dim=-1)
    return FeatureData(x, y, xv, yv, text, logit_scale=100.0)


def bench_heads(classes: int, shots: int, repeats: int = 3) -> list[list]:
    from fsclip.adapters import get_adapter
    from fsclip.backends import load_model

    backend = load_model(SPEC, device="cpu")
    _ = backend.fingerprint  # computed once, outside the timings
    data = synthetic_features(classes, shots)
    names = [f"class {i}" for i in range(classes)]
    rows = []
    for method in ("linear-probe", "tip-adapter", "tip-adapter-f"):
        cls = get_adapter(method)
        config = cls.config_class(templates="generic")
        adapter = cls.fit_features(backend, names, data, config)
        timing = measure(lambda cls=cls, config=config: cls.fit_features(backend, names, data, config), repeats)
        acc = (adapter.logits_from_features(data.val).argmax(-1) == data.val_targets).float().mean().item()
        rows.append([f"{method} fit", f"{classes} classes x {shots} shots, dim 512, cached features",
                     timing.time(), f"val accuracy {acc:.2f}"])
    return rows


def _write_images(folder: Path, classes: int = 4, per_class: int = 12, size: int = 256) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
            Image.fromarray(arr).resize((size, size), Image.BILINEAR).save(folder / f"class_{c}" / f"{i}.jpg")


def _step_cost(method: str, steps: int, threads: int, queue) -> None:
    """Child process: seconds per training step (two run lengths, differenced) and peak RSS."""
    torch.set_num_threads(threads)
    from fsclip.adapters import fit
    from fsclip.backends import load_model
    from fsclip.data import load_image_folder

    backend = load_model(SPEC, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        _write_images(Path(tmp) / "train")
        _write_images(Path(tmp) / "val", per_class=1)
        train, val = load_image_folder(Path(tmp) / "train"), load_image_folder(Path(tmp) / "val")
        times = {}
        for n in (1, 1 + steps):
            t0 = time.perf_counter()
            fit(backend, train, method, val=val, templates="generic", iters=n, eval_every=n, batch_size=32)
            times[n] = time.perf_counter() - t0
    per_step = (times[1 + steps] - times[1]) / steps
    queue.put((per_step, peak_rss_mib()))


def bench_steps(steps: int) -> list[list]:
    threads = torch.get_num_threads()
    ctx = mp.get_context("spawn")
    rows = []
    for method, what in (("lora", "LoRA r=2 on q, k, v of both towers"), ("full-ft", "full fine-tuning, image tower")):
        queue = ctx.Queue()
        proc = ctx.Process(target=_step_cost, args=(method, steps, threads, queue))
        proc.start()
        per_step, peak_mib = queue.get()
        proc.join()
        rows.append([f"{method} step", f"ViT-B-32 (random weights), batch 32, CPU fp32: {what}",
                     f"{per_step:.2f} s/iter", f"peak RSS {peak_mib / 1024:.2f} GiB"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--lora-steps", type=int, default=4, help="training steps timed per method (0: skip)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); 1 is faster on a machine busy with other work")
    p.add_argument("--repeats", type=int, default=3, help="timed fits per head method (median, range)")
    p.add_argument("--quick", action="store_true", help="20 classes, one fit each, no LoRA: checks that it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.classes, args.lora_steps, args.repeats = 20, 0, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    with isolated_cache():
        rows = bench_heads(args.classes, args.shots, args.repeats)
        if args.lora_steps:
            rows += bench_steps(args.lora_steps)
    print(markdown_table(["workload", "setting", "time", "note"], rows))
    print(f"\n(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
