"""Results rows -> comparison tables (Markdown, CSV). Pure: reads the run directory only.

`results.jsonl` is the one source of the quality columns; stage.json files give
cost. `posttrain report RUN_DIR` regenerates every table from them.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

COST_COLUMNS = (("train_tokens", "train tokens"), ("optimizer_steps", "steps"), ("wall_s", "train time (s)"))


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pipeline_costs(run_dir: Path) -> dict[str, dict]:
    """Per pipeline: cost summed over its stages, averaged over seeds; stage count."""
    run_dir = Path(run_dir)
    mapping_file = run_dir / "pipelines.json"
    if not mapping_file.is_file():
        return {}
    costs = {}
    for pipeline, by_seed in json.loads(mapping_file.read_text()).items():
        per_seed = []
        for stage_dirs in by_seed.values():
            total = defaultdict(float)
            for name in stage_dirs:
                info = json.loads((run_dir / "stages" / name / "stage.json").read_text())
                for key, _ in COST_COLUMNS:
                    total[key] += info["cost"][key]
            per_seed.append(total)
        costs[pipeline] = {key: mean(t[key] for t in per_seed) if per_seed else 0.0 for key, _ in COST_COLUMNS}
        costs[pipeline]["stages"] = len(next(iter(by_seed.values()), []))
    return costs


def build_table(rows: list[dict], costs: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """One row per pipeline (in first-seen order), one column per task metric, then cost."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    pipelines: list[str] = []
    metrics: list[str] = []
    for row in rows:
        column = f"{row['task']} {row['metric']}"
        values[(row["pipeline"], column)].append(row["value"])
        if row["pipeline"] not in pipelines:
            pipelines.append(row["pipeline"])
        if column not in metrics:
            metrics.append(column)
    header = ["pipeline", "seeds", *metrics, "stages", *(label for _, label in COST_COLUMNS)]
    table = []
    for pipeline in pipelines:
        seeds = len(values[(pipeline, metrics[0])]) if metrics else 0
        cells = [pipeline, str(seeds)]
        for column in metrics:
            observed = values.get((pipeline, column), [])
            cells.append(f"{100 * mean(observed):.1f}" if observed else "")
        cost = costs.get(pipeline, {})
        cells.append(str(cost.get("stages", 0)))
        cells += [_fmt_cost(key, cost.get(key, 0.0)) for key, _ in COST_COLUMNS]
        table.append(cells)
    return header, table


def _fmt_cost(key: str, value: float) -> str:
    return f"{value:.1f}" if key == "wall_s" else f"{value:,.0f}"


def markdown(header: list[str], table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], table: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(table)
    return buffer.getvalue()


def write_report(run_dir: Path) -> str:
    """Write report.md and results.csv from the run's records; return the Markdown table."""
    from posttrain.artifacts import write_text_atomic

    run_dir = Path(run_dir)
    header, table = build_table(read_rows(run_dir), pipeline_costs(run_dir))
    table_md = markdown(header, table)
    write_text_atomic(run_dir / "results.csv", to_csv(header, table))
    write_text_atomic(run_dir / "report.md", (
        f"# {run_dir.name}\n\n"
        "Task metrics in percent (mean over seeds; the base model is evaluated once). "
        "Cost is summed over a pipeline's stages; a stage shared by several pipelines "
        "(e.g. SFT in `sft` and `sft+dpo`) was trained once.\n\n" + table_md))
    return table_md
