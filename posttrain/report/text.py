"""The report as text: the terminal's rich table, report.md and results.csv."""

from __future__ import annotations

import csv
import io

from posttrain.records import COST_COLUMNS, THROUGHPUT_COLUMNS
from posttrain.report.cells import (SIGNIFICANT, THROUGHPUT_NOTE, Table, cost_table, curation_table, extras_table, level,
                                    quality_table, sample_tables)


def main_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """The quality table as text: header and rows (the terminal, the W&B table)."""
    table = quality_table(report)
    return table.header, table.text_rows()


def terminal_table(report: dict):
    """The quality table as a rich Table for the terminal.

    Every text is escaped: rich reads "[...]" as markup, and would silently drop a
    filter name ("exact_match[concise]") or a sweep's pipeline name ("dpo[beta=0.2]").
    """
    from rich.markup import escape
    from rich.table import Table as RichTable

    header, rows = main_table(report)
    table = RichTable(title=escape(f"{report['title']} — eval spec {report['eval_spec']}"), show_lines=False)
    for name in header:
        table.add_column(escape(name), overflow="fold")
    for cells in rows:
        table.add_row(*map(escape, cells))
    return table


def markdown_table(table: Table) -> str:
    escape = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, table.header)) + " |", "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(map(escape, cells)) + " |" for cells in table.text_rows()]
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    parts = [
        f"# {report['title']}\n\n",
        f"Eval spec `{report['eval_spec']}` · baseline `{report['baseline']}` · {level(report)} intervals. "
        f"{report['ci_method']} Δ is the paired difference from the baseline (percentage points); "
        f"{SIGNIFICANT} marks a difference whose interval excludes zero — anything else is within the noise.\n\n",
        *(f"> {note}\n\n" for note in report.get("notes") or []),
        "## Quality\n\n", markdown_table(quality_table(report)),
        "\n## Cost\n\n",
        "Summed over each pipeline's stages (mean over seeds; peak memory is the maximum). A stage shared by "
        "several pipelines was trained once: its cost appears in each of them.\n\n",
        markdown_table(cost_table(report)),
        f"\n{THROUGHPUT_NOTE}\n",
    ]
    extras = extras_table(report)
    if extras:
        parts += ["\n## Preferences and reply length\n\n", markdown_table(extras)]
    curation = curation_table(report)
    if curation:
        parts += ["\n## Data curation\n\n", markdown_table(curation)]
    for task, table in sample_tables(report).items():
        parts += [f"\n## What the models say: {task}\n\n", markdown_table(table)]
    return "".join(parts)


def to_csv(report: dict) -> str:
    """One line per pipeline and quality column: the numbers as computed, unformatted."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["pipeline", "seeds", "column", "mean", "lo", "hi", "delta", "delta_lo", "delta_hi",
                     "significant", *COST_COLUMNS, *THROUGHPUT_COLUMNS])
    for p in report["pipelines"]:
        for column in report["columns"]:
            m, d = p["metrics"].get(column), p["delta"].get(column)
            if not m:
                continue
            writer.writerow([p["name"], p["seeds"], column, m["mean"], m["lo"], m["hi"],
                             *(d[k] if d else "" for k in ("mean", "lo", "hi", "significant")),
                             *(p["cost"][k] for k in COST_COLUMNS),
                             *("" if p["cost"].get(k) is None else p["cost"][k] for k in THROUGHPUT_COLUMNS)])
    return buffer.getvalue()
