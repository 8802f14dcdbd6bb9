"""The comparison report of one run (or a merge of runs), regenerated from its records.

    build      run directories -> the report (report.json): statistics, cost, curves
    cells      the report's tables, built once (cells with their text and numbers)
    text       the terminal's table, report.md, results.csv
    html       report.html (self-contained)
    plots      plots/*.png

Imports go one way (build and cells know no renderer); matplotlib, numpy and rich are
imported only where they are used.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.report.build import build_report
from posttrain.report.text import main_table, markdown, terminal_table, to_csv

__all__ = ["build_report", "main_table", "markdown", "terminal_table", "to_csv", "write_report"]


def write_report(run_dir: Path, extra_runs: list[Path] = (), out_dir: Path | None = None) -> dict:
    """Write report.json/.md/.html, results.csv and plots/ for one run (or a merge of runs)."""
    from posttrain.artifacts import RunDir
    from posttrain.report.html import render_html
    from posttrain.report.plots import render_plots

    out = RunDir(out_dir or run_dir)
    report = build_report([Path(run_dir), *map(Path, extra_runs)])
    out.area.write_json(out.report_json, report)
    out.area.write_text(out.report_md, markdown(report))
    out.area.write_text(out.results_csv, to_csv(report))
    plots = render_plots(report, out.plots)
    out.area.write_text(out.report_html, render_html(report, plots))
    return report
