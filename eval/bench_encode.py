"""Encoding speed: fsclip vs open_clip on the ViT-B-32 architecture (random weights; speed only).

    python -m eval.bench_encode [--images 256] [--prompts 1000]

Prints a Markdown table of ratios measured in this one run:
- text: fsclip `encode_texts` (short sequences) vs open_clip `encode_text` (full context), 1,000 short prompts;
- images: fsclip end to end on large JPEGs (decode overlapped with compute) vs the pure model forward
  on ready tensors, and vs a naive loop (PIL open + open_clip preprocess + forward, batch 32).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eval._timing import markdown_table, median_time


def _prompts(n: int) -> list[str]:
    words = ["cat", "dog", "golden retriever", "airliner", "fire truck", "tabby", "sports car", "sunflower",
             "espresso", "mountain bike", "red fox", "jellyfish", "castle", "lighthouse", "volcano", "pizza"]
    return [f"a photo of a {words[i % len(words)]} number {i}." for i in range(n)]


def _write_jpegs(folder: Path, n: int, size=(3000, 2000)) -> list[Path]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize(size, Image.BILINEAR)  # smooth content, realistic JPEG size
    paths = []
    for i in range(n):
        p = folder / f"photo_{i:04d}.jpg"
        img.rotate(i % 4 * 90, expand=True).save(p, quality=90)
        paths.append(p)
    return paths


def bench_text(backend, ref_model, tokenizer, n: int, batch_size: int = 256) -> list:
    prompts = _prompts(n)

    def ours():
        return backend.encode_texts(prompts, batch_size=batch_size)

    @torch.inference_mode()
    def theirs():
        return torch.cat([ref_model.encode_text(tokenizer(prompts[i : i + batch_size]), normalize=True)
                          for i in range(0, n, batch_size)])

    # The full-context baseline is slow on CPU (minutes): one timed run each, after a short warm-up.
    backend.encode_texts(prompts[:64], batch_size=batch_size)
    t0 = time.perf_counter()
    fast = ours()
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = theirs()
    t_ref = time.perf_counter() - t0
    diff = (fast - slow).abs().max().item()
    return [f"text, {n} short prompts", f"{n / t_ours:.0f} prompts/s", "open_clip encode_text",
            f"{n / t_ref:.0f} prompts/s", f"**{t_ref / t_ours:.1f}x**", f"max abs diff {diff:.1e}"]


def bench_images(backend, ref_model, ref_preprocess, paths: list[Path], batch_size: int = 32) -> list[list]:
    from fsclip.encode import iter_encoded

    n = len(paths)
    pixels = torch.randn(n, 3, 224, 224)

    def pure():
        backend.encode_images(pixels, batch_size=batch_size)

    def ours():
        got = sum(len(b.indices) for b in iter_encoded(backend, paths, batch_size=batch_size))
        assert got == n

    @torch.inference_mode()
    def naive():
        for i in range(0, n, batch_size):
            batch = []
            for p in paths[i : i + batch_size]:
                with Image.open(p) as im:
                    batch.append(ref_preprocess(im.convert("RGB")))
            ref_model.encode_image(torch.stack(batch), normalize=True)

    t_pure = median_time(pure, repeats=1)
    t_ours = median_time(ours, repeats=1)
    t_naive = median_time(naive, repeats=1, warmup=0)
    return [
        [f"images, {n} JPEGs 3000x2000", f"{n / t_ours:.1f} img/s", "pure model forward on tensors",
         f"{n / t_pure:.1f} img/s", f"**{t_pure / t_ours:.2f}x**", "end-to-end / model-only rate"],
        [f"images, {n} JPEGs 3000x2000", f"{n / t_ours:.1f} img/s", "naive PIL + preprocess loop",
         f"{n / t_naive:.1f} img/s", f"**{t_naive / t_ours:.1f}x**", "batch 32 both"],
    ]


def run(n_prompts: int = 1000, n_images: int = 256) -> str:
    import open_clip

    from fsclip.backends.openclip import OpenClipBackend

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")  # random weights
    model.eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    backend = OpenClipBackend("ViT-B-32", model, torch.device("cpu"), torch.float32, preprocess, tokenizer)
    rows = [bench_text(backend, model, tokenizer, n_prompts)] if n_prompts else []
    if n_images:
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench_images(backend, model, preprocess, _write_jpegs(Path(tmp), n_images))
    header = ["workload", "fsclip", "baseline", "baseline rate", "speed-up", "note"]
    return markdown_table(header, rows) + f"\n\n(torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=1000)
    p.add_argument("--images", type=int, default=256)
    args = p.parse_args(argv)
    print(run(args.prompts, args.images))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
