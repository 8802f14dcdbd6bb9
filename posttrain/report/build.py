"""Run directories -> the report (a JSON-able dict: report.json).

Pure: reads only what a run recorded — `results.jsonl`, the per-sample records it
points to, `pipelines.json`, and each stage's `stage.json` / `trainer_log.jsonl` —
so `posttrain report RUN_DIR [RUN_DIR ...]` regenerates everything, byte for byte
(bootstraps are seeded). Run directories of every format so far are read (format 1:
written before the records were typed).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from posttrain.artifacts import RUN_FORMAT, PathEscape, RunDir
from posttrain.errors import DataError, PosttrainError
from posttrain.recipe.schema import BASE_PIPELINE
from posttrain.records import COST_COLUMNS, DAMAGED_HINT, THROUGHPUT_COLUMNS, ResultRow, StageRecord, read_json, read_jsonl, read_results
from posttrain.stages import METHODS

CURVE_KEYS = ("loss", "nll_loss", "log_odds_ratio", "rewards/margins", "rewards/accuracies", "mean_token_accuracy")
NOT_COLUMNS = ("reply_tokens",)          # reported separately, no per-item records
PREFERENCE_TASK = "preferences"


@dataclass
class Run:
    """One run directory as the report reads it."""

    dir: RunDir
    rows: list[ResultRow]
    recipe: dict
    stages: dict          # pipelines.json: {pipeline: {seed: [stage folder, ...]}}
    records: dict = field(default_factory=dict, repr=False)   # stage folder -> StageRecord, read once

    @property
    def name(self) -> str:
        return self.dir.root.name

    def stage(self, stage_dir: str) -> StageRecord:
        """A stage's record, read once however many tables, curves and notes need it (a stage
        shared by several pipelines is in each of them)."""
        if stage_dir not in self.records:
            self.records[stage_dir] = StageRecord.read(self.dir.stage_record(stage_dir))
        return self.records[stage_dir]


# ---------------------------------------------------------------- reading


def read_rows(run: RunDir) -> list[ResultRow]:
    path = run.results
    if not path.is_file():
        raise PosttrainError(f"{run.root}: no {path.name} (is this a finished run directory?)")
    rows = read_results(path, check=lambda row: _outside(run, row.samples))
    if not rows:
        raise PosttrainError(f"{path}: no result rows ({DAMAGED_HINT})")
    return rows


def _outside(run: RunDir, samples: str | None) -> str | None:
    """Why a row's per-sample records cannot be read: the path must be relative and inside
    the run directory (a damaged or planted row must not make the report read elsewhere)."""
    if samples is None:
        return None
    try:
        if isinstance(samples, str) and not Path(samples).is_absolute():
            run.area.check(run.root / samples, "read")
            return None
    except PathEscape:
        pass
    return f"'samples' must be a file inside the run directory, not {samples!r}"


def read_recipe(run: RunDir) -> dict:
    path = run.recipe
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


def load_runs(run_dirs: list[Path]) -> list[Run]:
    """Each run's rows, recipe and stage map; refuse runs that measured different things."""
    runs = []
    for run_dir in run_dirs:
        run = RunDir(Path(run_dir).resolve())  # `.` and an absolute path name the same run
        if run.format > RUN_FORMAT:
            raise PosttrainError(f"{run.root}: written by a newer posttrain (run directory format {run.format}; "
                                 f"this version reads formats 1 to {RUN_FORMAT}): update posttrain to report it")
        runs.append(Run(run, read_rows(run), read_recipe(run), read_json(run.pipelines, default={})))
    specs = {run.name: sorted({row.eval_spec for row in run.rows}, key=str) for run in runs}
    if len({tuple(spec) for spec in specs.values()}) > 1 or any(len(spec) > 1 for spec in specs.values()):
        raise PosttrainError(
            "cannot merge runs evaluated with different eval specs (tasks, few-shot, chat template, "
            "generation settings or lm-eval version differ)",
            [f"{name}: eval spec {', '.join(map(str, spec))}" for name, spec in specs.items()])
    return runs


def pipeline_names(runs: list[Run]) -> dict[tuple[int, str], str]:
    """Display name per (run index, pipeline): prefixed with the run when names collide."""
    seen = defaultdict(list)
    for index, run in enumerate(runs):
        for name in dict.fromkeys(row.pipeline for row in run.rows):
            seen[name].append(index)
    return {(index, name): (f"{runs[index].name}:{name}" if len(indices) > 1 else name)
            for name, indices in seen.items() for index in indices}


# ---------------------------------------------------------------- statistics


def interval_dict(interval, significant: bool | None = None) -> dict:
    out = {"mean": interval.mean, "lo": interval.lo, "hi": interval.hi,
           "n_seeds": interval.n_seeds, "n_items": interval.n_items}
    if significant is not None:
        out["significant"] = significant
    return out


def quality(runs: list[Run], names: dict, settings: dict) -> tuple[list[str], dict, dict]:
    """Per pipeline and column: mean with interval, and paired delta vs the baseline."""
    from posttrain.stats import mean_interval, paired_delta, score_matrix

    grouped: dict[tuple[str, str], list] = defaultdict(list)
    columns: list[str] = []
    for index, run in enumerate(runs):
        for row in run.rows:
            if row.samples and row.metric not in NOT_COLUMNS and row.task != PREFERENCE_TASK:
                columns += [row.column] if row.column not in columns else []
                grouped[(names[(index, row.pipeline)], row.column)].append((run, row))
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


def merge_records(entries: list[tuple[Run, ResultRow]]) -> dict[int | None, dict[int, float]]:
    """{seed: {item: score}} for one pipeline and column, from the per-sample files."""
    from posttrain.samples import item_scores

    return {row.seed: item_scores(run.dir.root / row.samples, row.metric) for run, row in entries}


def preference_metrics(runs: list[Run], names: dict, settings: dict) -> dict[str, dict]:
    from posttrain.stats import mean_interval, score_matrix

    grouped: dict[tuple[str, str], list] = defaultdict(list)
    for index, run in enumerate(runs):
        for row in run.rows:
            if row.task == PREFERENCE_TASK and row.samples:
                grouped[(names[(index, row.pipeline)], row.metric)].append((run, row))
    out: dict[str, dict] = defaultdict(dict)
    for (pipeline, metric), entries in grouped.items():
        interval = mean_interval(score_matrix(merge_records(entries))[0], confidence=settings["confidence"],
                                 resamples=settings["resamples"])
        out[pipeline][metric] = interval_dict(interval)
    return out


# ---------------------------------------------------------------- cost and curves


def pipeline_cost(run: Run, pipeline: str) -> tuple[dict, list[dict]]:
    """Cost summed over the pipeline's stages, averaged over seeds; stages with sharing."""
    by_seed = run.stages.get(pipeline, {})
    totals = []
    for stage_dirs in by_seed.values():
        total = dict.fromkeys(COST_COLUMNS, 0.0)
        costs = [run.stage(stage_dir).cost for stage_dir in stage_dirs]
        for cost in costs:
            for key in COST_COLUMNS:
                total[key] = (max(total[key], getattr(cost, key)) if key == "peak_memory_mb"
                              else total[key] + getattr(cost, key))
        totals.append({**total, **pipeline_throughput(costs)})
    cost = {key: (mean(t[key] for t in totals) if totals else 0.0) for key in COST_COLUMNS}
    cost.update({key: (mean(t[key] for t in totals) if totals and None not in [t[key] for t in totals] else None)
                 for key in THROUGHPUT_COLUMNS})
    stages = []
    first_seed_dirs = next(iter(by_seed.values()), [])
    for stage_dir in first_seed_dirs:
        record = run.stage(stage_dir)
        shared = [other for other, seeds in run.stages.items()
                  if other != pipeline and any(stage_dir in dirs for dirs in seeds.values())]
        stages.append({"stage": record.stage, "method": record.method, "shared_with": shared})
    return cost, stages


def pipeline_throughput(costs: list) -> dict:
    """A pipeline's throughput over its stages (one seed): tokens over the summed training
    time, MFU the summed model FLOPs over the summed time x peak x world size. None when a
    stage did not measure it (a record from before it was, or MFU on CPU / an unknown device)."""
    out = dict.fromkeys(THROUGHPUT_COLUMNS)
    if not costs or any(c.train_runtime_s is None for c in costs):
        return out
    runtime = sum(c.train_runtime_s for c in costs)
    out["tokens_per_s_real"] = sum(c.tokens_real for c in costs) / runtime if runtime else None
    out["tokens_per_s_padded"] = sum(c.tokens_padded for c in costs) / runtime if runtime else None
    out["world_size"] = max(c.world_size or 1 for c in costs)
    if all(c.mfu is not None and c.model_flops and c.peak_flops_per_device for c in costs):
        capacity = sum(c.train_runtime_s * c.peak_flops_per_device * (c.world_size or 1) for c in costs)
        out["mfu"] = sum(c.model_flops for c in costs) / capacity if capacity else None
    return out


def curves(runs: list[Run]) -> list[dict]:
    out = []
    for run in runs:
        stage_dirs = sorted({d for seeds in run.stages.values() for dirs in seeds.values() for d in dirs})
        for stage_dir in stage_dirs:
            record = run.stage(stage_dir)
            log_path = run.dir.trainer_log(stage_dir)
            series: dict[str, list] = defaultdict(list)
            method = METHODS.get(record.method)   # a run made with a method this version lacks: the defaults
            keys = method.curves if method else CURVE_KEYS
            for entry in read_jsonl(log_path) if log_path.is_file() else []:
                for key in keys:
                    if key in entry and "step" in entry:
                        series[key].append([entry["step"], entry[key]])
            label = f"{record.stage} (seed {record.seed})" + (f" [{run.name}]" if len(runs) > 1 else "")
            out.append({"label": label, "stage": record.stage, "method": record.method, "seed": record.seed,
                        "series": dict(series)})
    return out


# ---------------------------------------------------------------- samples


def side_by_side(runs: list[Run], names: dict, count: int) -> dict[str, list[dict]]:
    """For each generation task, the first `count` items with every pipeline's reply (first seed)."""
    from posttrain.samples import generated_replies

    per_task: dict[str, dict[str, dict]] = defaultdict(dict)
    for index, run in enumerate(runs):
        for row in run.rows:
            name = names[(index, row.pipeline)]
            if row.samples and row.task != PREFERENCE_TASK and name not in per_task[row.task]:
                replies = generated_replies(run.dir.root / row.samples)
                if replies:
                    per_task[row.task][name] = replies
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


def report_settings(runs: list[Run], names: dict) -> dict:
    from posttrain.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES

    recipe = runs[0].recipe
    report_spec = recipe.get("report") or {}
    ordered = list(dict.fromkeys(names[(i, row.pipeline)] for i, run in enumerate(runs) for row in run.rows))
    trained = [name for name in ordered if any(name in run.stages and any(run.stages[name].values())
                                                for run in runs)]
    baseline = report_spec.get("baseline") or (trained[0] if trained else ordered[0])
    if baseline not in ordered:  # merged runs prefix colliding names: take the first run's
        baseline = next((name for name in ordered if name.endswith(f":{baseline}")), baseline)
    return {"baseline": baseline, "confidence": report_spec.get("confidence", DEFAULT_CONFIDENCE),
            "resamples": report_spec.get("resamples", DEFAULT_RESAMPLES),
            "samples": (recipe.get("eval") or {}).get("samples", 5),
            "pipelines": ordered}


def curation_summary(runs: list[Run]) -> dict[str, dict]:
    """Per curated dataset (first run): rows in -> out, removals by reason and by eval task."""
    data = read_json(runs[0].dir.data, default={})
    return {entry["name"]: entry["curation"] for entry in data.values() if entry.get("curation")}


def compute_match_notes(runs: list[Run], names: dict) -> list[str]:
    """What `compare: {match: tokens}` changed, from each run's plan.json."""
    notes = []
    for index, run in enumerate(runs):
        matching = read_json(run.dir.plan, default={}).get("compute_match")
        for pipeline, note in ((matching or {}).get("pipelines") or {}).items():
            reference = names.get((index, matching["reference"]), matching["reference"])
            notes.append(f"Compute matched (compare.match: tokens): {names.get((index, pipeline), pipeline)} trains "
                         f"{note['max_steps']:,} optimizer steps (was {note['was_steps']:,}) so that its train tokens "
                         f"match {reference}'s estimated {note['target_tokens']:,}; the cost table shows the "
                         "tokens actually trained.")
    return notes


def template_notes(runs: list[Run], names: dict) -> list[str]:
    """A base model evaluated with chat-template tokens its tokenizer did not have (ChatML
    on a base model): their rows were never trained, so its row measures the template."""
    notes = []
    for index, run in enumerate(runs):
        template = read_json(run.dir.plan, default={}).get("template") or {}
        added = template.get("added_tokens") or []
        if added and any(row.pipeline == BASE_PIPELINE for row in run.rows):
            notes.append(
                f"{names.get((index, BASE_PIPELINE), BASE_PIPELINE)} is evaluated with the chat template's "
                f"{', '.join(added)}, which its tokenizer did not have: posttrain added them, with untrained "
                "(mean) rows, so the base row measures the template as much as the model; the trained pipelines "
                "learned these tokens. Compare the trained pipelines with each other, or evaluate the base in a "
                "recipe of its own with model.chat_template: model where its tokenizer has a template.")
    return notes


def row_notes(runs: list[Run], names: dict) -> list[str]:
    """Stages whose trainer kept fewer rows than it was given or cut rows at max_length,
    once per stage (first seed), and a warning when stages given the same rows of a dataset
    trained different numbers of them."""
    notes, seen = [], set()
    trained_of = defaultdict(dict)   # (dataset, rows given) -> {stage label: rows trained}
    for run in runs:
        for seeds in run.stages.values():
            for stage_dir in next(iter(seeds.values()), []):
                record = run.stage(stage_dir)
                cost, dataset = record.cost, record.data.get("name", "?")
                if cost.rows_trained is None or record.key in seen:
                    continue
                seen.add(record.key)
                label = f"{record.stage} ({record.method})" if record.method != record.stage else record.stage
                trained_of[(dataset, cost.rows_given)][label] = cost.rows_trained
                if cost.rows_dropped:
                    notes.append(f"Stage {label} trained on {cost.rows_trained:,} of the {cost.rows_given:,} rows of "
                                 f"{dataset!r}: {cost.rows_dropped:,} were dropped before training (the prompt "
                                 "filled max_length, leaving nothing to train on).")
                if cost.rows_truncated:
                    notes.append(f"Stage {label} cut {cost.rows_truncated:,} of the {cost.rows_trained:,} rows it "
                                 f"trained at max_length ({record.settings.get('max_length', '?')} tokens): their "
                                 "tokens past it were not trained, and its train tokens count only those kept.")
    for (dataset, given), counts in trained_of.items():
        if len(set(counts.values())) > 1:
            shown = ", ".join(f"{label} {rows:,}" for label, rows in counts.items())
            notes.append(f"Stages given the same {given:,} rows of {dataset!r} trained on different numbers of them "
                         f"({shown}): the pipelines' differences include which rows each saw, not only how each "
                         "trained.")
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
        for row in run.rows:
            name = names[(index, row.pipeline)]
            seeds[name].add(row.seed)
            if row.metric == "reply_tokens":
                reply_tokens[name][row.task].append(row.value)
    pipelines = []
    for index, run in enumerate(runs):
        for pipeline in dict.fromkeys(row.pipeline for row in run.rows):
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
        "title": " + ".join(run.name for run in runs),
        "runs": [run.name for run in runs],  # names, not paths: the report survives a move
        "eval_spec": next((row.eval_spec for row in runs[0].rows), None),
        "ci_method": ci_method_text(settings["confidence"], settings["resamples"]),
        "confidence": settings["confidence"], "resamples": settings["resamples"], "baseline": settings["baseline"],
        "columns": columns, "pipelines": pipelines, "curves": curves(runs),
        "samples": side_by_side(runs, names, settings["samples"]),
        "curation": curation_summary(runs),
        "notes": compute_match_notes(runs, names) + template_notes(runs, names) + row_notes(runs, names),
    }
