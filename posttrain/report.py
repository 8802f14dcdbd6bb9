"""Run directories -> the comparison report (report.json/.md/.html, results.csv, plots).

Pure: reads only what a run recorded — `results.jsonl`, the per-sample records it
points to, `pipelines.json`, and each stage's `stage.json` / `trainer_log.jsonl` —
so `posttrain report RUN_DIR [RUN_DIR ...]` regenerates everything, byte for byte
(bootstraps are seeded).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path
from statistics import mean

from posttrain.errors import DataError, PosttrainError
from posttrain.records import DAMAGED_HINT, read_json, read_jsonl

COST_KEYS = ("train_tokens", "optimizer_steps", "forward_passes", "backward_passes", "wall_s", "peak_memory_mb")
CURVE_KEYS = ("loss", "nll_loss", "log_odds_ratio", "rewards/margins", "rewards/accuracies", "mean_token_accuracy")
NOT_COLUMNS = ("reply_tokens",)          # reported separately, no per-item records
PREFERENCE_TASK = "preferences"
REPORT_FILES = ("report.json", "report.md", "report.html", "results.csv")
RESULT_TYPES = {"pipeline": str, "seed": (int, type(None)), "task": str, "metric": str,
                "value": (int, float, type(None))}   # what every results.jsonl row holds
RESULT_KEYS = tuple(RESULT_TYPES)
SIGNIFICANT = "✱"


# ---------------------------------------------------------------- reading


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "results.jsonl"
    if not path.is_file():
        raise PosttrainError(f"{run_dir}: no results.jsonl (is this a finished run directory?)")
    rows = read_jsonl(path, RESULT_KEYS)
    if not rows:
        raise PosttrainError(f"{path}: no result rows ({DAMAGED_HINT})")
    for number, row in enumerate(rows, 1):
        wrong = [key for key, types in RESULT_TYPES.items() if not isinstance(row[key], types)
                 or isinstance(row[key], bool)]
        if wrong:
            raise PosttrainError(f"{path}: row {number}: wrong type for {', '.join(map(repr, wrong))} "
                                 f"({DAMAGED_HINT})")
        samples = row.get("samples")
        if samples is not None and not _inside(run_dir, samples):
            raise PosttrainError(f"{path}: row {number}: 'samples' must be a file inside the run directory, "
                                 f"not {samples!r} ({DAMAGED_HINT})")
    return rows


def _inside(run_dir: Path, relative) -> bool:
    """A records path the report may read: relative, and inside the run directory."""
    from posttrain.artifacts import Area, PathEscape

    if not isinstance(relative, str) or Path(relative).is_absolute():
        return False
    try:
        Area(run_dir).check(Path(run_dir) / relative, "read")
    except PathEscape:
        return False
    return True


def read_recipe(run_dir: Path) -> dict:
    path = Path(run_dir) / "recipe.resolved.yaml"
    if not path.is_file():
        return {}
    from posttrain.recipe.yamlfile import strict_yaml_load

    try:
        recipe, _ = strict_yaml_load(path.read_bytes(), str(path), error=DataError)
    except DataError as exc:
        raise DataError(f"{exc} ({DAMAGED_HINT})", exc.problems) from None
    if not isinstance(recipe, dict):
        raise DataError(f"{path}: expected a recipe mapping ({DAMAGED_HINT})")
    return recipe


def load_runs(run_dirs: list[Path]) -> list[dict]:
    """Each run's rows, recipe and stage map; refuse runs that measured different things."""
    runs = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir).resolve()  # `.` and an absolute path name the same run
        rows = read_rows(run_dir)
        stage_map = run_dir / "pipelines.json"
        runs.append({"dir": run_dir, "rows": rows, "recipe": read_recipe(run_dir),
                     "stages": read_json(stage_map, default={})})
    specs = {run["dir"].name: sorted({row.get("eval_spec") for row in run["rows"]}, key=str) for run in runs}
    if len({tuple(spec) for spec in specs.values()}) > 1 or any(len(spec) > 1 for spec in specs.values()):
        raise PosttrainError(
            "cannot merge runs evaluated with different eval specs (tasks, few-shot, chat template, "
            "generation settings or lm-eval version differ)",
            [f"{name}: eval spec {', '.join(map(str, spec))}" for name, spec in specs.items()])
    return runs


def pipeline_names(runs: list[dict]) -> dict[tuple[int, str], str]:
    """Display name per (run index, pipeline): prefixed with the run when names collide."""
    seen = defaultdict(list)
    for index, run in enumerate(runs):
        for name in dict.fromkeys(row["pipeline"] for row in run["rows"]):
            seen[name].append(index)
    return {(index, name): (f"{runs[index]['dir'].name}:{name}" if len(indices) > 1 else name)
            for name, indices in seen.items() for index in indices}


# ---------------------------------------------------------------- statistics


def column_name(row: dict) -> str:
    return f"{row['task']}/{row['metric']}"


def interval_dict(interval, significant: bool | None = None) -> dict:
    out = {"mean": interval.mean, "lo": interval.lo, "hi": interval.hi,
           "n_seeds": interval.n_seeds, "n_items": interval.n_items}
    if significant is not None:
        out["significant"] = significant
    return out


def score_records(run_dir: Path, rows: list[dict]) -> dict[int | None, dict[int, float]]:
    """{seed: {item: score}} for one pipeline and column, from the per-sample files."""
    from posttrain.samples import item_scores

    return {row["seed"]: item_scores(run_dir / row["samples"], row["metric"]) for row in rows}


def quality(runs: list[dict], names: dict, settings: dict) -> tuple[list[str], dict, dict]:
    """Per pipeline and column: mean with interval, and paired delta vs the baseline."""
    from posttrain.stats import mean_interval, paired_delta, score_matrix

    grouped: dict[tuple[str, str], list] = defaultdict(list)
    columns: list[str] = []
    for index, run in enumerate(runs):
        for row in run["rows"]:
            if row.get("samples") and row["metric"] not in NOT_COLUMNS and row["task"] != PREFERENCE_TASK:
                column = column_name(row)
                columns += [column] if column not in columns else []
                grouped[(names[(index, row["pipeline"])], column)].append((run["dir"], row))
    matrices = {key: score_matrix(merge_records(entries))[0] for key, entries in grouped.items()}
    metrics = {key: mean_interval(m, confidence=settings["confidence"], resamples=settings["resamples"])
               for key, m in matrices.items()}
    deltas = {}
    for (pipeline, column), matrix in matrices.items():
        base = matrices.get((settings["baseline"], column))
        if base is not None and pipeline != settings["baseline"]:
            deltas[(pipeline, column)] = paired_delta(matrix, base, confidence=settings["confidence"],
                                                      resamples=settings["resamples"])
    return columns, metrics, deltas


def merge_records(entries: list) -> dict:
    records: dict = {}
    for run_dir, row in entries:
        records.update(score_records(run_dir, [row]))
    return records


def preference_metrics(runs: list[dict], names: dict, settings: dict) -> dict[str, dict]:
    from posttrain.stats import mean_interval, score_matrix

    grouped: dict[tuple[str, str], list] = defaultdict(list)
    for index, run in enumerate(runs):
        for row in run["rows"]:
            if row["task"] == PREFERENCE_TASK and row.get("samples"):
                grouped[(names[(index, row["pipeline"])], row["metric"])].append((run["dir"], row))
    out: dict[str, dict] = defaultdict(dict)
    for (pipeline, metric), entries in grouped.items():
        interval = mean_interval(score_matrix(merge_records(entries))[0], confidence=settings["confidence"],
                                 resamples=settings["resamples"])
        out[pipeline][metric] = interval_dict(interval)
    return out


# ---------------------------------------------------------------- cost and curves


def stage_info(run_dir: Path, stage_dir: str) -> dict:
    return read_json(run_dir / "stages" / stage_dir / "stage.json")


def pipeline_cost(run: dict, pipeline: str) -> tuple[dict, list[dict]]:
    """Cost summed over the pipeline's stages, averaged over seeds; stages with sharing."""
    by_seed = run["stages"].get(pipeline, {})
    totals = []
    for stage_dirs in by_seed.values():
        total = dict.fromkeys(COST_KEYS, 0.0)
        for stage_dir in stage_dirs:
            cost = stage_info(run["dir"], stage_dir)["cost"]
            for key in COST_KEYS:
                total[key] = (max(total[key], cost.get(key, 0.0)) if key == "peak_memory_mb"
                              else total[key] + cost.get(key, 0.0))
        totals.append(total)
    cost = {key: (mean(t[key] for t in totals) if totals else 0.0) for key in COST_KEYS}
    stages = []
    first_seed_dirs = next(iter(by_seed.values()), [])
    for stage_dir in first_seed_dirs:
        info = stage_info(run["dir"], stage_dir)
        shared = [other for other, seeds in run["stages"].items()
                  if other != pipeline and any(stage_dir in dirs for dirs in seeds.values())]
        stages.append({"stage": info["stage"], "method": info["method"], "shared_with": shared})
    return cost, stages


def curves(runs: list[dict]) -> list[dict]:
    out = []
    for run in runs:
        stage_dirs = sorted({d for seeds in run["stages"].values() for dirs in seeds.values() for d in dirs})
        for stage_dir in stage_dirs:
            info = stage_info(run["dir"], stage_dir)
            log_path = run["dir"] / "stages" / stage_dir / "trainer_log.jsonl"
            series: dict[str, list] = defaultdict(list)
            for entry in read_jsonl(log_path) if log_path.is_file() else []:
                for key in CURVE_KEYS:
                    if key in entry and "step" in entry:
                        series[key].append([entry["step"], entry[key]])
            label = f"{info['stage']} (seed {info['seed']})" + (f" [{run['dir'].name}]" if len(runs) > 1 else "")
            out.append({"label": label, "stage": info["stage"], "method": info["method"], "seed": info["seed"],
                        "series": dict(series)})
    return out


# ---------------------------------------------------------------- samples


def side_by_side(runs: list[dict], names: dict, count: int) -> dict[str, list[dict]]:
    """For each generation task, the first `count` items with every pipeline's reply (first seed)."""
    from posttrain.samples import generated_replies

    per_task: dict[str, dict[str, dict]] = defaultdict(dict)
    for index, run in enumerate(runs):
        for row in run["rows"]:
            name = names[(index, row["pipeline"])]
            if row.get("samples") and row["task"] != PREFERENCE_TASK and name not in per_task[row["task"]]:
                replies = generated_replies(run["dir"] / row["samples"])
                if replies:
                    per_task[row["task"]][name] = replies
    out = {}
    for task, by_pipeline in per_task.items():
        if not by_pipeline:
            continue  # not a generation task
        first = next(iter(by_pipeline.values()))
        out[task] = [{"doc_id": doc_id, "prompt": first[doc_id]["prompt"], "target": first[doc_id]["target"],
                      "replies": {p: r[doc_id]["reply"] for p, r in by_pipeline.items() if doc_id in r}}
                     for doc_id in sorted(first)[:count]]
    return out


# ---------------------------------------------------------------- the report


def report_settings(runs: list[dict], names: dict) -> dict:
    from posttrain.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES

    recipe = runs[0]["recipe"]
    report_spec = recipe.get("report") or {}
    ordered = list(dict.fromkeys(names[(i, row["pipeline"])] for i, run in enumerate(runs) for row in run["rows"]))
    trained = [name for name in ordered if any(name in run["stages"] and any(run["stages"][name].values())
                                                for run in runs)]
    baseline = report_spec.get("baseline") or (trained[0] if trained else ordered[0])
    if baseline not in ordered:  # merged runs prefix colliding names: take the first run's
        baseline = next((name for name in ordered if name.endswith(f":{baseline}")), baseline)
    return {"baseline": baseline, "confidence": report_spec.get("confidence", DEFAULT_CONFIDENCE),
            "resamples": report_spec.get("resamples", DEFAULT_RESAMPLES), "samples": (recipe.get("eval") or {}).get("samples", 5),
            "pipelines": ordered}


def curation_summary(runs: list[dict]) -> dict[str, dict]:
    """Per curated dataset (first run): rows in -> out, removals by reason and by eval task."""
    path = runs[0]["dir"] / "data.json"
    data = read_json(path, default={})
    return {entry["name"]: entry["curation"] for entry in data.values() if entry.get("curation")}


def curation_table(report: dict) -> tuple[list[str], list[list[str]]]:
    header = ["dataset", "rows in", "rows out", "removed (reason: rows)", "contaminated (eval task: rows)"]
    rows = []
    for name, c in report.get("curation", {}).items():
        removed = "; ".join(f"{reason}: {count}" for reason, count in c["removed"].items() if count)
        contaminated = "; ".join(f"{task}: {count}" for task, count in c["contaminated_by_task"].items())
        rows.append([name, f"{c['rows_in']:,}", f"{c['rows_out']:,}", removed or "—", contaminated or "—"])
    return header, rows


def compute_match_notes(runs: list[dict], names: dict) -> list[str]:
    """What `compare: {match: tokens}` changed, from each run's plan.json."""
    notes = []
    for index, run in enumerate(runs):
        path = run["dir"] / "plan.json"
        matching = read_json(path, default={}).get("compute_match")
        for pipeline, note in ((matching or {}).get("pipelines") or {}).items():
            reference = names.get((index, matching["reference"]), matching["reference"])
            notes.append(f"Compute matched (compare.match: tokens): {names.get((index, pipeline), pipeline)} trains "
                         f"{note['max_steps']:,} optimizer steps (was {note['was_steps']:,}) so that its train tokens "
                         f"match {reference}'s estimated {note['target_tokens']:,}; the cost table shows the "
                         "tokens actually trained.")
    return notes


def build_report(run_dirs: list[Path]) -> dict:
    from posttrain.stats import ci_method_text

    runs = load_runs([Path(d) for d in run_dirs])
    names = pipeline_names(runs)
    settings = report_settings(runs, names)
    columns, metrics, deltas = quality(runs, names, settings)
    preferences = preference_metrics(runs, names, settings)
    reply_tokens: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    seeds: dict[str, set] = defaultdict(set)
    for index, run in enumerate(runs):
        for row in run["rows"]:
            name = names[(index, row["pipeline"])]
            seeds[name].add(row["seed"])
            if row["metric"] == "reply_tokens":
                reply_tokens[name][row["task"]].append(row["value"])
    pipelines = []
    for index, run in enumerate(runs):
        for pipeline in dict.fromkeys(row["pipeline"] for row in run["rows"]):
            name = names[(index, pipeline)]
            cost, stages = pipeline_cost(run, pipeline)
            entry = {
                "name": name, "seeds": len(seeds[name]), "stages": stages, "cost": cost,
                "metrics": {c: interval_dict(metrics[(name, c)]) for c in columns if (name, c) in metrics},
                "delta": {c: interval_dict(deltas[(name, c)], deltas[(name, c)].excludes_zero)
                          for c in columns if (name, c) in deltas},
                "reply_tokens": {task: mean(values) for task, values in reply_tokens[name].items()},
            }
            if name in preferences:
                entry["preferences"] = preferences[name]
            pipelines.append(entry)
    return {
        "title": " + ".join(run["dir"].name for run in runs),
        "runs": [run["dir"].name for run in runs],  # names, not paths: the report survives a move
        "eval_spec": next((row.get("eval_spec") for row in runs[0]["rows"]), None),
        "ci_method": ci_method_text(settings["confidence"], settings["resamples"]),
        "confidence": settings["confidence"], "resamples": settings["resamples"], "baseline": settings["baseline"],
        "columns": columns, "pipelines": pipelines, "curves": curves(runs),
        "samples": side_by_side(runs, names, settings["samples"]),
        "curation": curation_summary(runs),
        "notes": compute_match_notes(runs, names),
    }


# ---------------------------------------------------------------- rendering


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def cell(interval: dict | None) -> str:
    if not interval:
        return ""
    return f"{pct(interval['mean'])} [{pct(interval['lo'])}, {pct(interval['hi'])}]"


def delta_cell(delta: dict | None) -> str:
    if not delta:
        return ""
    text = f"{100 * delta['mean']:+.1f} [{100 * delta['lo']:+.1f}, {100 * delta['hi']:+.1f}]"
    return f"{text} {SIGNIFICANT}" if delta["significant"] else text


def main_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Quality: per pipeline each column's mean [interval] and its delta vs the baseline."""
    header = ["pipeline", "seeds"]
    for column in report["columns"]:
        header += [column, f"Δ {column}"]
    rows = []
    for p in report["pipelines"]:
        cells = [p["name"], str(p["seeds"])]
        for column in report["columns"]:
            cells += [cell(p["metrics"].get(column)), delta_cell(p["delta"].get(column))]
        rows.append(cells)
    return header, rows


def stage_list(p: dict) -> str:
    parts = [s["stage"] + (f" (shared with {', '.join(s['shared_with'])})" if s["shared_with"] else "")
             for s in p["stages"]]
    return " → ".join(parts) or "—"


def cost_table(report: dict) -> tuple[list[str], list[list[str]]]:
    header = ["pipeline", "stages", "train tokens", "optimizer steps", "forward passes", "backward passes",
              "train time (s)", "peak memory (MB)"]
    rows = [[p["name"], stage_list(p), *(f"{p['cost'][k]:,.0f}" for k in COST_KEYS[:4]),
             f"{p['cost']['wall_s']:.1f}", f"{p['cost']['peak_memory_mb']:.0f}"] for p in report["pipelines"]]
    return header, rows


def extras_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Preference metrics on held-out pairs and mean reply length per pipeline."""
    tasks = sorted({t for p in report["pipelines"] for t in p["reply_tokens"]})
    has_prefs = any("preferences" in p for p in report["pipelines"])
    header = ["pipeline"] + (["prefers chosen (%)", "mean log-prob margin"] if has_prefs else [])
    header += [f"reply tokens ({t})" for t in tasks]
    rows = []
    for p in report["pipelines"]:
        prefs = p.get("preferences", {})
        cells = [p["name"]]
        if has_prefs:
            margin = prefs.get("margin")
            cells += [cell(prefs.get("pref_acc")),
                      f"{margin['mean']:.2f} [{margin['lo']:.2f}, {margin['hi']:.2f}]" if margin else ""]
        cells += [f"{p['reply_tokens'][t]:.1f}" if t in p["reply_tokens"] else "" for t in tasks]
        rows.append(cells)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    escape = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(escape, cells)) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    from posttrain.stats import level_text

    parts = [
        f"# {report['title']}\n\n",
        f"Eval spec `{report['eval_spec']}` · baseline `{report['baseline']}` · {level_text(report['confidence'])} "
        "intervals. "
        f"{report['ci_method']} Δ is the paired difference from the baseline (percentage points); "
        f"{SIGNIFICANT} marks a difference whose interval excludes zero — anything else is within the noise.\n\n",
        *(f"> {note}\n\n" for note in report.get("notes") or []),
        "## Quality\n\n", markdown_table(*main_table(report)),
        "\n## Cost\n\n",
        "Summed over each pipeline's stages (mean over seeds; peak memory is the maximum). A stage shared by "
        "several pipelines was trained once: its cost appears in each of them.\n\n",
        markdown_table(*cost_table(report)),
        "\n## Preferences and reply length\n\n", markdown_table(*extras_table(report)),
    ]
    if report.get("curation"):
        parts += ["\n## Data curation\n\n", markdown_table(*curation_table(report))]
    for task, items in report["samples"].items():
        pipelines = [p["name"] for p in report["pipelines"]]
        header = ["prompt", "reference", *pipelines]
        rows = [[item["prompt"], str(item["target"]), *(item["replies"].get(p, "") for p in pipelines)]
                for item in items]
        parts += [f"\n## What the models say: {task}\n\n", markdown_table(header, rows)]
    return "".join(parts)


def to_csv(report: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["pipeline", "seeds", "column", "mean", "lo", "hi", "delta", "delta_lo", "delta_hi",
                     "significant", *COST_KEYS])
    for p in report["pipelines"]:
        for column in report["columns"]:
            m, d = p["metrics"].get(column), p["delta"].get(column)
            if not m:
                continue
            writer.writerow([p["name"], p["seeds"], column, m["mean"], m["lo"], m["hi"],
                             *(d[k] if d else "" for k in ("mean", "lo", "hi", "significant")),
                             *(p["cost"][k] for k in COST_KEYS)])
    return buffer.getvalue()


def write_report(run_dir: Path, extra_runs: list[Path] = (), out_dir: Path | None = None) -> dict:
    """Write report.json/.md/.html, results.csv and plots/ for one run (or a merge of runs)."""
    from posttrain.artifacts import Area
    from posttrain.report_html import render_html, render_plots

    out_dir = Path(out_dir or run_dir)
    area = Area(out_dir)
    report = build_report([Path(run_dir), *map(Path, extra_runs)])
    area.write_json(out_dir / "report.json", report)
    area.write_text(out_dir / "report.md", markdown(report))
    area.write_text(out_dir / "results.csv", to_csv(report))
    plots = render_plots(report, out_dir / "plots")
    area.write_text(out_dir / "report.html", render_html(report, plots))
    return report


def terminal_table(report: dict):
    """The quality table as a rich Table for the terminal.

    Every text is escaped: rich reads "[...]" as markup, and would silently drop a
    filter name ("exact_match[concise]") or a sweep's pipeline name ("dpo[beta=0.2]").
    """
    from rich.markup import escape
    from rich.table import Table

    header, rows = main_table(report)
    table = Table(title=escape(f"{report['title']} — eval spec {report['eval_spec']}"), show_lines=False)
    for name in header:
        table.add_column(escape(name), overflow="fold")
    for cells in rows:
        table.add_row(*map(escape, cells))
    return table
