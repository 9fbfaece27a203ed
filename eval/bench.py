"""All benchmarks in one run: one table of ratios, printed and written to eval/results/bench.md.

    python -m eval.bench all            # every benchmark, full size (minutes)
    python -m eval.bench all --quick    # small sizes, to check that everything runs
    python -m eval.bench encode search  # a subset; the others' sections stay as the last report had them

Each benchmark module (eval.bench_encode, eval.bench_search, eval.bench_fewshot, eval.bench_scale,
eval.bench_runtime) measures its own comparisons and prints Markdown tables (its `main(["--quick"])` is the small run);
this collects them, each with a fresh, empty FSCLIP_CACHE. Every row of the combined table says what was
measured, what it was compared with, and the ratio, so that rows from different benchmarks read the
same way. A module that is missing is skipped with a note. The README's figures are generated from the
report this writes (`python -m eval.readme_figures`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from eval._timing import isolated_cache, markdown_table

OUT = Path(__file__).resolve().parent / "results" / "bench.md"


@dataclass(frozen=True)
class Bench:
    """One benchmark module, run through its `main(argv)`; `--quick` makes a small run."""

    name: str
    module: str


BENCHES = (
    Bench("encode", "eval.bench_encode"),
    Bench("search", "eval.bench_search"),
    Bench("fewshot", "eval.bench_fewshot"),
    Bench("scale", "eval.bench_scale"),
    Bench("runtime", "eval.bench_runtime"),
)
RATIO_HEADER = re.compile(r"speed-?up|ratio|\bvs\b|\bx\b|×", re.IGNORECASE)


def run_bench(bench: Bench, quick: bool) -> str | None:
    """The benchmark's printed output (Markdown), or None when its module does not exist."""
    try:
        module = importlib.import_module(bench.module)
    except ModuleNotFoundError as e:
        if e.name == bench.module:
            return None
        raise
    out = io.StringIO()
    with contextlib.redirect_stdout(out), isolated_cache():
        module.main(["--quick"] if quick else [])
    return out.getvalue()


def parse_tables(text: str) -> tuple[list[tuple[str, list[str], list[list[str]]]], list[str]]:
    """Markdown text -> ([(section title, header, rows)], other non-empty lines)."""
    tables, notes, title = [], [], ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|\s*:?-{3,}", lines[i + 1].strip()):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            tables.append((title, header, rows))
            continue
        if line.startswith("#"):
            title = line.lstrip("#").strip()
        elif line:
            notes.append(line)
        i += 1
    return tables, notes


def combine(name: str, tables: Sequence[tuple[str, list[str], list[list[str]]]]) -> list[list[str]]:
    """Rows of the single table: benchmark | measured | compared with | ratio | details.

    The ratio is the last column whose header reads like one (speed-up, ratio, `vs`); the baseline is a
    `baseline` column where there is one, else what the ratio header says it is `vs`.
    """
    out = []
    for title, header, rows in tables:
        lower = [h.lower() for h in header]
        ratio_col = max((j for j, h in enumerate(header) if RATIO_HEADER.search(h)), default=None)
        base_cols = [j for j, h in enumerate(lower) if h.startswith("baseline")]
        implied = ""
        if ratio_col is not None and " vs " in f" {lower[ratio_col]} ":
            implied = re.split(r"\bvs\b", header[ratio_col], maxsplit=1, flags=re.IGNORECASE)[1].strip()
        used = {0, 1, *base_cols, *([ratio_col] if ratio_col is not None else [])}
        for row in rows:
            row = row + [""] * (len(header) - len(row))
            # the row's first two cells name it; a bare number needs its header ("20,000" -> "images 20,000")
            measured = "; ".join(f"{header[j]} {row[j]}" if j or row[j][:1].isdigit() else row[j]
                                 for j in (0, 1)[: len(header)] if row[j])
            compared = " at ".join(row[j] for j in base_cols if row[j]) or implied or "–"
            details = "; ".join(f"{header[j]}: {row[j]}" for j in range(len(header)) if j not in used and row[j])
            ratio = row[ratio_col] if ratio_col is not None else "–"
            out.append([f"{name}: {title}" if title else name, measured, compared, ratio or "–", details])
    return out


def machine() -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} at the "
            f"start; Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")


_SECTION = re.compile(r"^### (?P<name>\S+) \(`python -m (?P<module>[\w.]+)`, (?P<secs>\d+) s\)\n", re.MULTILINE)


def earlier_sections(report: str) -> tuple[str, dict[str, str]]:
    """A report written by `collect` -> (its run line, {benchmark name: its full-output section})."""
    run = re.search(r"measured in one run of `[^`]+` on \S+ \(\d+ s\): .+?\. Ratios compare", report)
    marks = list(_SECTION.finditer(report))
    sections = {m["name"]: report[m.start(): marks[i + 1].start() if i + 1 < len(marks) else len(report)].strip()
                for i, m in enumerate(marks)}
    return (run[0][: -len(". Ratios compare")] if run else "an earlier run"), sections


def collect(benches: Sequence[Bench], quick: bool = False, log=sys.stderr,
            earlier: str | None = None) -> tuple[str, str]:
    """Run `benches`; returns (the single table with notes, the full report for bench.md).

    With `earlier` (the previous report), the benchmarks not run now keep their rows and full output from
    it, each row marked with that run, and the report's first paragraph says which rows are older.
    """
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    where = machine()
    rows, notes, raw = [], [], []
    t0 = time.perf_counter()
    for bench in benches:
        print(f"[bench] {bench.name} ({bench.module}) ...", file=log, flush=True)
        t = time.perf_counter()
        try:
            text = run_bench(bench, quick)
        except (Exception, SystemExit) as e:  # one broken benchmark must not lose the others' numbers
            notes.append(f"{bench.name}: failed ({type(e).__name__}: {e})")
            print(f"[bench] {bench.name}: failed: {e!r}", file=log)
            continue
        if text is None:
            notes.append(f"{bench.name}: skipped, {bench.module} does not exist yet")
            print(f"[bench] {bench.name}: skipped ({bench.module} not found)", file=log)
            continue
        tables, extra = parse_tables(text)
        rows += combine(bench.name, tables)
        notes += [f"{bench.name}: {n}" for n in extra]
        raw.append(f"### {bench.name} (`python -m {bench.module}`, {time.perf_counter() - t:.0f} s)\n\n{text.strip()}")
    kept = []
    if earlier is not None:
        when, sections = earlier_sections(earlier)
        ran = {b.name for b in benches}
        for name, section in sections.items():
            if name in ran or quick:
                continue
            body = section.split("\n", 1)[1] if "\n" in section else ""
            tables, extra = parse_tables(body)
            rows += [[f"{r[0]} (earlier run)", *r[1:]] for r in combine(name, tables)]
            notes += [f"{name} (earlier run): {n}" for n in extra]
            raw.append(section)
            kept.append(name)
    header = ["benchmark", "measured", "compared with", "ratio", "details"]
    table = markdown_table(header, rows)
    summary = table + "\n\nNotes:\n" + "\n".join(f"- {n}" for n in notes) if notes else table
    names = " ".join(b.name for b in benches) if list(benches) != list(BENCHES) else "all"
    full = (f"# fsclip benchmarks\n\nAll ratios below were measured in one run of `python -m eval.bench "
            f"{names}{' --quick' if quick else ''}` on {started} "
            f"({time.perf_counter() - t0:.0f} s): {where}. Ratios compare two ways of doing the same work on the "
            f"same machine in the same process, so they travel better than absolute rates."
            + (f" Rows marked \"earlier run\" ({', '.join(kept)}) were not run this time: they come from the "
               f"report before, {when}." if kept else "") + "\n\n"
            f"{summary}\n\n## Full output of each benchmark\n\n" + "\n\n".join(raw) + "\n")
    return summary, full


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("benches", nargs="+", choices=["all", *(b.name for b in BENCHES)], help="which benchmarks")
    p.add_argument("--quick", action="store_true", help="small sizes: checks that everything runs, in seconds")
    p.add_argument("--out", type=Path, default=OUT, help=f"Markdown file to write (default: {OUT})")
    args = p.parse_args(argv)
    chosen = [b for b in BENCHES if "all" in args.benches or b.name in args.benches]
    earlier = args.out.read_text(encoding="utf-8") if args.out.is_file() and "all" not in args.benches else None
    summary, full = collect(chosen, args.quick, earlier=earlier)
    print(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text(full)
    os.replace(tmp, args.out)  # readers see the old report or the new one
    print(f"\nwritten to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
