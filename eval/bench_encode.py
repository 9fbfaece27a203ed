"""Encoding speed: fsclip vs open_clip on the ViT-B-32 architecture (random weights; speed only).

    python -m eval.bench_encode [--images 256] [--prompts 1000] [--repeats 3] [--quick]

Prints a Markdown table of ratios measured in this one run, each way of doing the work warmed up the same
way and timed `--repeats` times in interleaved rounds (median, with the slowest-fastest range):
- text: fsclip `encode_texts` (short sequences) vs open_clip `encode_text` (full context), 1,000 short prompts;
- images: fsclip end to end on large JPEGs (`iter_encoded`: decoding in threads overlapped with compute) vs
  the pure model forward on ready tensors, and vs what a competent user writes: a
  `torch.utils.data.DataLoader` with as many worker processes as fsclip has decoding threads, over a
  Dataset that opens each file with PIL and applies open_clip's preprocess, then `encode_image`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eval._timing import compare, isolated_cache, markdown_table


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


def bench_text(backend, ref_model, tokenizer, n: int, repeats: int, batch_size: int = 256) -> list:
    prompts = _prompts(n)

    def ours(texts=prompts):
        return backend.encode_texts(texts, batch_size=batch_size)

    @torch.inference_mode()
    def theirs(texts=prompts):
        return torch.cat([ref_model.encode_text(tokenizer(texts[i : i + batch_size]), normalize=True)
                          for i in range(0, len(texts), batch_size)])

    # The full-context baseline takes minutes on a CPU: both warm up on the same 64 prompts instead.
    ours(prompts[:64])
    theirs(prompts[:64])
    t = compare({"ours": ours, "theirs": theirs}, repeats=repeats, warmup=0)
    diff = (ours() - theirs()).abs().max().item()
    return [f"text, {n} short prompts", t["ours"].rate(n, " prompts/s"), "open_clip encode_text",
            t["theirs"].rate(n, " prompts/s"), f"**{t['theirs'].median / t['ours'].median:.1f}x**",
            f"max abs diff {diff:.1e}; median of {repeats}"]


class _Files(torch.utils.data.Dataset):
    """The baseline's Dataset: PIL open + convert + open_clip preprocess, one file per item."""

    def __init__(self, paths: list[Path], preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            return self.preprocess(im.convert("RGB"))


def bench_images(backend, ref_model, ref_preprocess, paths: list[Path], repeats: int, batch_size: int = 32) -> list[list]:
    from fsclip.encode import iter_encoded

    workers = min(4, os.cpu_count() or 1)  # fsclip's default decoding threads; the baseline gets as many processes
    pixels = torch.randn(len(paths), 3, 224, 224)

    def pure(k: int | None = None):
        backend.encode_images(pixels[:k], batch_size=batch_size)

    def ours(files=paths):
        got = sum(len(b.indices) for b in iter_encoded(backend, files, batch_size=batch_size, num_workers=workers))
        assert got == len(files)

    @torch.inference_mode()
    def loader(files=paths):
        data = torch.utils.data.DataLoader(_Files(files, ref_preprocess), batch_size=batch_size, num_workers=workers)
        for batch in data:
            ref_model.encode_image(batch, normalize=True)

    warm = paths[: 2 * batch_size]  # the same small warm-up for each way
    pure(len(warm))
    ours(warm)
    loader(warm)
    t = compare({"pure": pure, "ours": ours, "loader": loader}, repeats=repeats, warmup=0)
    n = len(paths)
    what = f"images, {n} JPEGs 3000x2000"
    return [
        [what, t["ours"].rate(n, " img/s"), "pure model forward on tensors", t["pure"].rate(n, " img/s"),
         f"**{t['pure'].median / t['ours'].median:.2f}x**", f"end-to-end / model-only rate; median of {repeats}"],
        [what, t["ours"].rate(n, " img/s"), f"DataLoader({workers} workers) + open_clip preprocess",
         t["loader"].rate(n, " img/s"), f"**{t['loader'].median / t['ours'].median:.2f}x**",
         f"batch {batch_size} both; {workers} decoding threads vs {workers} worker processes"],
    ]


def run(n_prompts: int = 1000, n_images: int = 256, repeats: int = 3) -> str:
    import open_clip

    from fsclip.backends.openclip import OpenClipBackend

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")  # random weights
    model.eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    backend = OpenClipBackend("ViT-B-32", model, torch.device("cpu"), torch.float32, preprocess, tokenizer)
    rows = [bench_text(backend, model, tokenizer, n_prompts, repeats)] if n_prompts else []
    if n_images:
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench_images(backend, model, preprocess, _write_jpegs(Path(tmp), n_images), repeats)
    header = ["workload", "fsclip", "baseline", "baseline rate", "speed-up", "note"]
    return markdown_table(header, rows) + f"\n\n(torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=1000)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each way, interleaved (default: 3)")
    p.add_argument("--quick", action="store_true", help="200 prompts, 16 images, one run: checks that it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.images, args.repeats = 200, 16, 1
    with isolated_cache():
        print(run(args.prompts, args.images, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
