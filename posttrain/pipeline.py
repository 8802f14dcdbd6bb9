"""A recipe's run, start to end: check, plan, train every stage (shared prefixes once,
finished stages reused), evaluate every pipeline and the base, write the report.

The parts live in `plan` (stage graph, keys, estimates, compute matching),
`training` (locks, checkpoints, signals) and `evaluation` (lm-eval, its cache).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from posttrain.artifacts import RunDir
from posttrain.evaluation import EvalSetup, evaluate_plan, prepare_eval
from posttrain.plan import (Plan, base_source, data_env, data_summary, disk_total, format_plan, load_stage_data, make_plan,
                            match_compute, pipeline_stage_dirs, plan_rows, stage_estimates)
from posttrain.errors import Interrupted, PosttrainError, TrainingDiverged
from posttrain.ranks import LeaderFailed, this_process
from posttrain.recipe.schema import Recipe, dump_recipe
from posttrain.training import RunOptions, train_plan

__all__ = ["RunOptions", "plan_recipe", "prepare_run", "run_recipe"]


def prepare_run(recipe: Recipe, options: RunOptions, run: RunDir) -> tuple[Plan, EvalSetup, dict]:
    """Everything before training: checks, eval tasks, data (curated, cached), compute matching, the plan."""
    from posttrain.checks import check_before_training, check_max_lengths, check_static
    from posttrain.evaluate import task_texts
    from posttrain.models import apply_chat_template_choice, load_tokenizer

    check_static(recipe, options.base_dir, world_size=options.world_size)   # again for callers other than the CLI
    options.cache.ensure()  # (the CLI did already) a folder of the user's is never written into
    setup = prepare_eval(recipe, run, options.base_dir)
    check_before_training(recipe, setup.refs, setup.task_dir, options.log, options.device, options.world_size)
    env = data_env(recipe, options.base_dir, cache_dir=options.cache.curated_dir(),
                   eval_texts=lambda: task_texts(setup.refs, setup.task_dir), log=options.log)
    data = load_stage_data(recipe, env)
    source = base_source(recipe)   # (reads a template file once)
    tokenizer = load_tokenizer(source)   # the chat tokenizer, loaded once for both
    added = apply_chat_template_choice(tokenizer, None, source.chat_template)
    estimates = stage_estimates(recipe, data, tokenizer)
    # No stage whose max_length leaves nothing to train; the rows each will drop go in the plan.
    for name, rows in check_max_lengths(recipe, data, options.log, tokenizer).items():
        estimates[name]["dropped"] = rows
    matching = None
    if recipe.compare is not None:
        recipe, estimates, matching = match_compute(recipe, data, estimates)
    plan = make_plan(recipe, env, data, cache_root=options.cache.root, world_size=options.world_size,
                     device=options.device, gpu_memory_gb=options.gpu_memory_gb)
    template = {"chat_template": recipe.model.chat_template if recipe.model.template_file() or len(
        recipe.model.chat_template) < 80 else "(Jinja)", "identity": plan.template,
        "eos": tokenizer.eos_token, "added_tokens": tokenizer.convert_ids_to_tokens(list(added))}
    return plan, setup, {"estimates": estimates, "compute_match": matching, "template": template}


def plan_recipe(recipe: Recipe, options: RunOptions) -> dict:
    """What `posttrain plan` / `run --dry-run` show; loads (and curates) data, trains nothing."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        plan, _setup, info = prepare_run(recipe, options, RunDir(Path(scratch)))
        rows = plan_rows(plan, options.cache, info["estimates"])
        return {"cache": str(options.cache.root), "stages": rows, "compute_match": info["compute_match"],
                "disk": disk_total(rows), "pipelines": {f"{pipeline}/{seed}": node.key if node else None
                              for (pipeline, seed), node in plan.finals.items()},
                "text": format_plan(plan, rows, info)}


def run_recipe(recipe: Recipe, options: RunOptions) -> Path | None:
    """Train every pipeline (shared prefixes once), evaluate each and the base; write results.

    Under a launcher (torchrun, accelerate launch) every process calls this: rank 0 does
    all of it, the others train with it and return None (posttrain.ranks)."""
    from posttrain.artifacts import environment
    from posttrain.records import ResultRow, write_results
    from posttrain.report import main_table, write_report

    if not options.show_progress:
        os.environ.setdefault("TQDM_DISABLE", "1")  # datasets/TRL bars are noise in logs
    options.ranks = this_process()
    if not options.ranks.is_main:
        return follow_recipe(recipe, options)
    run = RunDir(options.out_dir)

    def start():   # the other ranks wait for it, and stop with it when it fails
        run.claim(recipe.name, force=options.force)
        run.area.write_json(run.env, environment())
        return make_tracker(recipe, run, options), *prepare_run(recipe, options, run)

    tracker, plan, setup, info = options.ranks.leader_first(start)
    options.ranks.broadcast(stage_keys(plan))
    if options.ranks.world > 1:
        options.log(f"{options.ranks.world} processes train each stage; this one (rank 0) writes and evaluates")
    rows_of_plan = record_plan(plan, info, run, options)
    train_plan(plan, rows_of_plan, run, options, tracker)
    rows = evaluate_plan(plan, run, options, setup, tracker)
    write_results(run.area, run.results, [ResultRow.from_json(row) for row in rows])
    report = write_report(run.root)
    tracker.log_report(*main_table(report), run.report_html)
    run.area.unlink(run.failed)  # an earlier attempt's failure, fixed now
    return run.root


def follow_recipe(recipe: Recipe, options: RunOptions) -> None:
    """A rank other than 0: plan as rank 0 did (after it, reading the data it cached),
    check both planned the same stages, and train them with it. It writes into a scratch
    run directory only and logs nothing; rank 0 evaluates after training."""
    from dataclasses import replace

    options = replace(options, log=lambda line: None)
    try:
        follow_plan(recipe, options)
    except (LeaderFailed, Interrupted, TrainingDiverged):
        raise   # rank 0 says it (cli.said_by_rank_zero)
    except PosttrainError as exc:
        exc.rank = options.ranks.rank   # met by this rank only: it says so itself
        exc.args = (f"{options.ranks}: {exc.args[0]}", *exc.args[1:]) if exc.args else exc.args
        raise


def follow_plan(recipe: Recipe, options: RunOptions) -> None:
    plan = plan_in_scratch(recipe, options)
    leader = options.ranks.broadcast(None)
    if leader != stage_keys(plan):
        raise PosttrainError(f"planned other stages than rank 0 ({len(stage_keys(plan))} "
                             f"vs {len(leader)}, first difference "
                             f"{next((a for a, b in zip(stage_keys(plan), leader) if a != b), '-')[:12]}); "
                             "every process must see the same recipe, data and cache")
    # A follower writes nothing into the run directory and reports nothing (no tracker).
    train_plan(plan, [], RunDir(options.out_dir), options, None)


def plan_in_scratch(recipe: Recipe, options: RunOptions) -> Plan:
    """The plan, made after rank 0 made it (reading the data it cached), by a process that
    does not write the run directory: the eval tasks planning copies go to a scratch folder,
    removed at once (processes that start together would replace each other's copies)."""
    with tempfile.TemporaryDirectory(prefix=f"posttrain-rank{options.ranks.rank}-") as scratch:
        plan, _setup, _info = options.ranks.leader_first(lambda: prepare_run(recipe, options, RunDir(Path(scratch))))
    return plan


def stage_keys(plan: Plan) -> list[str]:
    return [node.key for node in plan.nodes.values()]


def make_tracker(recipe: Recipe, run: RunDir, options: RunOptions):
    from posttrain.tracking import Tracker, WandbSettings

    spec = recipe.tracking.wandb
    return Tracker(WandbSettings(**spec.model_dump()) if spec else None, run.root, recipe.name, log=options.log)


def record_plan(plan: Plan, info: dict, run: RunDir, options: RunOptions) -> list[dict]:
    """Write what the run will do (resolved recipe, plan, data, pipelines' stage folders) and
    say it; the plan's rows, in training order."""
    rows = plan_rows(plan, options.cache, info["estimates"])
    run.area.write_text(run.recipe, dump_recipe(plan.recipe))   # after compute matching
    run.area.write_json(run.plan, {"cache": str(options.cache.root), "stages": rows, "disk": disk_total(rows),
                                   "compute_match": info["compute_match"], "template": info.get("template")})
    run.area.write_json(run.data, data_summary(plan))
    run.area.write_json(run.pipelines, pipeline_stage_dirs(plan, run))
    for data in plan.data.values():
        if data.skipped:
            options.log(f"data {data.name}: skipped {len(data.skipped)} malformed rows (on_bad_rows: skip)")
    matching = info["compute_match"] or {}
    for pipeline, note in (matching.get("pipelines") or {}).items():
        options.log(f"compute matching: {pipeline} trains {note['max_steps']} steps to match "
                    f"{matching['reference']}'s ~{note['target_tokens']:,} tokens")
    to_train = [row for row in rows if row["status"] != "reuse"]
    resumes = [f"{row['stage']} (seed {row['seed']}) from step {row['status'].split('@')[1]}"
               for row in rows if row["status"].startswith("resume@")]
    options.log(f"plan: {len(plan.nodes)} stage runs for {len(plan.finals)} (pipeline, seed) pairs; "
                f"{len(plan.nodes) - len(to_train)} reused from {options.cache.root}, {len(to_train)} to train"
                + (f" (resuming {', '.join(resumes)})" if resumes else ""))
    for row in rows:
        if row.get("why"):
            options.log(f"  {row['stage']} (seed {row['seed']}) trains again: {row['why']}")
    return rows
