"""`python -m eval.bench`: one table from the benchmarks' own Markdown, and notes for missing ones."""

from __future__ import annotations

import io

from eval.bench import Bench, collect, combine, parse_tables

# The formats the benchmark modules print (eval/bench_encode.py, eval/bench_search.py, eval/bench_fewshot.py)
ENCODE = """| workload | fsclip | baseline | baseline rate | speed-up | note |
|---|---|---|---|---|---|
| text, 1000 short prompts | 900 prompts/s | open_clip encode_text | 150 prompts/s | **6.0x** | max abs diff 1e-07 |

(torch 2.5, 2 threads, fp32 CPU)
"""
SEARCH = """## Flat vs IVF (synthetic unit vectors)

| vectors | index | build s | bytes/vector | QPS 1 query | QPS batch of 1000 | recall@10 | speed-up vs flat (1 query / batch) |
|---|---|---|---|---|---|---|---|
| embedding-like 1,000,000 x 512 | flat (exact) | 1.0 | 2056 | 3.1 | 40 | 1.000 | 1x / 1x |
| embedding-like 1,000,000 x 512 | IVF4096 nprobe 16 (tuned) | 60 | 2080 | 300 | 2000 | 0.975 | **97x** / 50x |

## Peak RSS of `fsclip index build` (shapes model, 64x64 PNGs, median of 3)

| images | peak RSS MiB | img/s (whole command) | index bytes/image | peak RSS vs smallest |
|---|---|---|---|---|
| 20,000 | 420 | 300 | 400 | 1.05x |
"""


def test_rows_say_what_was_compared_with_what():
    tables, notes = parse_tables(ENCODE)
    assert notes == ["(torch 2.5, 2 threads, fp32 CPU)"]
    [row] = combine("encode", tables)
    assert row == ["encode", "text, 1000 short prompts; fsclip 900 prompts/s", "open_clip encode_text at 150 prompts/s",
                   "**6.0x**", "note: max abs diff 1e-07"]
    rows = combine("search", parse_tables(SEARCH)[0])
    assert [r[0] for r in rows] == ["search: Flat vs IVF (synthetic unit vectors)"] * 2 + [
        "search: Peak RSS of `fsclip index build` (shapes model, 64x64 PNGs, median of 3)"]
    assert rows[1][1:4] == ["embedding-like 1,000,000 x 512; index IVF4096 nprobe 16 (tuned)",
                            "flat (1 query / batch)", "**97x** / 50x"]
    assert "recall@10: 0.975" in rows[1][4]
    assert rows[2][1:4] == ["images 20,000; peak RSS MiB 420", "smallest", "1.05x"]


def test_missing_and_failing_benchmarks_become_notes():
    log = io.StringIO()
    benches = [Bench("gone", "eval.bench_that_does_not_exist"), Bench("broken", "eval._timing")]  # no run/main
    summary, full = collect(benches, quick=True, log=log)
    assert "- gone: skipped, eval.bench_that_does_not_exist does not exist yet" in summary
    assert "- broken: failed (AttributeError" in summary
    assert full.startswith("# fsclip benchmarks") and "`python -m eval.bench gone broken --quick`" in full
    assert "| benchmark | measured | compared with | ratio | details |" in summary
