"""Benchmark: ``inspect_source`` (``posttrain data inspect``) on a 100,000-row JSON lines file.

The file is generated in a temporary folder from the noisy builtin skills
(``posttrain.data.noisy.noisy_skills_rows``: 30% clean rows plus duplicates, wrong,
truncated, boilerplate and leaked rows), written in the ``messages`` layout, with
one malformed line appended so the bad-row path is exercised.  Each configuration
is timed ``--runs`` times (min and median reported): lengths in whitespace words
(the default), and in characters (``count_tokens=len``, what the builtin
character-level tokenizer costs).

Reproduce (from the repository root):

    .venv/bin/python benchmarks/data_inspect.py            # --rows 100000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from posttrain.data.inspect import format_inspection, inspect_source  # noqa: E402
from posttrain.data.noisy import NOISE_MIX, noisy_skills_rows  # noqa: E402


def write_rows(path: Path, rows: int) -> None:
    n_clean = -(-rows * 3 // 10)  # clean rows are 30% of the noisy set
    data = noisy_skills_rows(n_clean=n_clean, seed=0)
    while len(data) < rows:  # rounding: top up with the first rows again
        data += data[: rows - len(data)]
    with path.open("w", encoding="utf-8") as handle:
        for row in data[:rows]:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.write('{"messages": [{"role": "user", "content": "no reply"}]\n')  # bad JSON


def time_runs(path: Path, runs: int, **options) -> tuple[list[float], dict]:
    times, stats = [], {}
    for _ in range(runs):
        start = time.perf_counter()
        stats = inspect_source(path, **options)
        times.append(time.perf_counter() - start)
    return times, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    assert abs(sum(NOISE_MIX.values()) - 1) < 1e-9

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "noisy_skills.jsonl"
        start = time.perf_counter()
        write_rows(path, args.rows)
        generated = time.perf_counter() - start
        size_mb = path.stat().st_size / 1e6
        print(f"generated {args.rows:,} rows (+1 malformed line), {size_mb:.1f} MB in {generated:.1f} s")
        machine = platform.processor() or platform.machine()
        print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {machine}")
        for label, options in (("whitespace words", {}), ("characters (count_tokens=len)", {"count_tokens": len})):
            times, stats = time_runs(path, args.runs, **options)
            rate = stats["rows"] / min(times)
            print(f"inspect_source, {label}: min {min(times):.2f} s, median {statistics.median(times):.2f} s "
                  f"over {args.runs} runs ({rate:,.0f} rows/s)")
        print()
        print(format_inspection(stats))


if __name__ == "__main__":
    main()
