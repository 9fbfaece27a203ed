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


def test_a_subset_run_keeps_the_other_benchmarks_rows_from_the_report_before():
    from eval.readme_figures import render

    _, before = collect([Bench("encode", "eval.bench_that_does_not_exist")], quick=True, log=io.StringIO())
    before = before.replace("`python -m eval.bench encode --quick`", "`python -m eval.bench all`")
    before += f"\n### search (`python -m eval.bench_search`, 846 s)\n\n{SEARCH}"
    summary, full = collect([Bench("encode", "eval.bench_that_does_not_exist")], log=io.StringIO(), earlier=before)
    assert "| search: Flat vs IVF (synthetic unit vectors) (earlier run) | embedding-like 1,000,000 x 512" in summary
    assert 'Rows marked "earlier run" (search) were not run this time' in full
    assert "### search (`python -m eval.bench_search`, 846 s)" in full  # its full output is kept too
    assert "- encode: skipped" in summary  # what ran now reports as usual
    block = render(full)
    assert block.startswith("Measured by `python -m eval.bench encode` on ")
    assert 'Rows marked "earlier run" (search) come from `python -m eval.bench all` on ' in block


def test_readme_figures_are_the_committed_bench_report():
    """README.md's benchmark block is exactly what `python -m eval.readme_figures` writes from bench.md."""
    from eval.readme_figures import BENCH, README, render, update

    readme = README.read_text(encoding="utf-8")
    assert update(readme, render(BENCH.read_text(encoding="utf-8"))) == readme, \
        "README.md's benchmark block is stale: run `python -m eval.readme_figures`"


def test_readme_figures_block_comes_from_the_report_and_nothing_else():
    from eval.readme_figures import BEGIN, END, render, update

    _, full = collect([], quick=True, log=io.StringIO())  # a report with no rows: the header and the table
    report = full.replace(" (0 s)", " (7 s)") + "\n| stray | table |\n|---|---|\n| in the full output | x |\n"
    block = render(report)
    assert block.startswith("Measured by `python -m eval.bench  --quick` on ")
    assert "| benchmark | measured | compared with | ratio | details |" in block and "stray" not in block
    readme = f"# x\n\nbefore\n{BEGIN}\nold figures\n{END}\nafter\n"
    new = update(readme, block)
    assert new == f"# x\n\nbefore\n{BEGIN}\n{block}\n{END}\nafter\n" and update(new, block) == new


def test_compare_warms_up_alike_and_interleaves_the_runs():
    from eval._timing import Timing, compare

    calls = []
    timings = compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=2)
    assert calls == ["a", "b"] * 2 + ["a", "b", "b", "a", "a", "b"]  # the start rotates each round
    assert [len(t.seconds) for t in timings.values()] == [3, 3]
    t = Timing((2.0, 1.0, 4.0))
    assert (t.median, t.spread, t.rate(8, " img/s"), t.time()) == (2.0, (1.0, 4.0), "4.00 (2.00-8.00) img/s",
                                                                   "2.00 (1.00-4.00) s")


def test_peak_memory_is_read_from_the_measured_process():
    """A child allocating 200 MiB reports its own peak, not this process's (ru_maxrss would be inherited)."""
    import subprocess
    import sys

    from eval._timing import peak_rss_mib

    code = ("import numpy as np; from eval._timing import peak_rss_mib; a = np.ones(200 * 2**20 // 8); "
            "print(peak_rss_mib())")
    small = float(subprocess.run([sys.executable, "-c", "from eval._timing import peak_rss_mib; print(peak_rss_mib())"],
                                 capture_output=True, text=True, check=True).stdout)
    big = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 150 < big - small < 260 and small < peak_rss_mib()  # this process holds torch and more
