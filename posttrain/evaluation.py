"""Evaluating a pipeline's model: the eval tasks prepared once per run, lm-eval through
posttrain.evaluate, held-out preference pairs, reply lengths, and the evaluation cache
keyed by the model's identity and the eval spec."""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.artifacts import RunDir, content_hash, library_versions
from posttrain.cache import write_manifest
from posttrain.data.sources import fingerprint, load_data
from posttrain.models import ModelSource
from posttrain.plan import Plan, source_after
from posttrain.recipe.schema import Recipe
from posttrain.samples import PREFERENCE_FILE, generated_replies, samples_file

if TYPE_CHECKING:
    from posttrain.training import RunOptions


@dataclass
class EvalSetup:
    """What every evaluated model shares: tasks, their prepared copies, the spec hash."""

    refs: list
    task_dir: Path
    spec_hash: str
    preference_pairs: list[dict]


def prepare_eval(recipe: Recipe, run: RunDir, base_dir: Path) -> EvalSetup:
    from posttrain.evaluate import eval_spec_hash, prepare_task_dir, resolve_tasks, task_search_dirs
    from posttrain.models import CHATML_TEMPLATE

    refs = resolve_tasks(recipe.eval.tasks, task_search_dirs(base_dir))
    task_dir = prepare_task_dir(refs, run.evals / "tasks", run.area)
    pairs = []
    if recipe.eval.preferences is not None:
        pairs = load_data("eval.preferences", recipe.eval.preferences, "preference", base_dir).examples
    settings = {
        "eval": recipe.eval.model_dump(mode="json", exclude={"batch_size", "samples"}),
        # ChatML's text; the model's own or the recipe's Jinja are in the model's key (plan.template_identity)
        "chat_template": CHATML_TEMPLATE if recipe.model.chat_template == "chatml" else "model's own",
        "preferences": fingerprint(pairs) if pairs else None,
    }
    return EvalSetup(refs, task_dir, eval_spec_hash(refs, task_dir, settings), pairs)


def evaluate_source(recipe: Recipe, pipeline: str, seed: int | None, source: ModelSource, run: RunDir,
                    options: RunOptions, setup: EvalSetup) -> list[dict]:
    """Evaluate one model; lm-eval's output and our per-sample records go to its eval dir."""
    from posttrain.evaluate import evaluate_model
    from posttrain.models import load_model_and_tokenizer
    from posttrain.stages.common import device

    spec = recipe.eval
    out_dir = run.eval_dir(pipeline, seed)
    run.area.rmtree(out_dir)  # one set of records per evaluation
    run.area.mkdir(out_dir)   # (lm-eval writes into it: created here, through the guard)
    model, tokenizer = load_model_and_tokenizer(source, device=device())
    model.eval()
    options.log(f"  eval   {pipeline}" + ("" if seed is None else f" (seed {seed})"))
    rows = evaluate_model(
        model, tokenizer, setup.refs, task_dir=setup.task_dir, out_dir=out_dir, label=pipeline,
        apply_chat_template=spec.apply_chat_template, num_fewshot=spec.num_fewshot,
        batch_size=spec.batch_size, limit=spec.limit, max_gen_toks=spec.max_gen_toks,
        seed=seed if seed is not None else 0)
    for row in rows:
        sample_file = samples_file(out_dir, row["task"])
        row["samples"] = str(sample_file.relative_to(run.root)) if sample_file else None
    rows += reply_length_rows(tokenizer, out_dir, setup.refs)
    if setup.preference_pairs:
        rows += preference_rows(model, tokenizer, setup.preference_pairs, out_dir, run, spec.batch_size)
    del model
    gc.collect()
    return [{"pipeline": pipeline, "seed": seed, "eval_spec": setup.spec_hash, **row} for row in rows]


def reply_length_rows(tokenizer, out_dir: Path, refs) -> list[dict]:
    """Mean reply length in tokens per generation task (preference tuning lengthens replies)."""
    rows = []
    for ref in refs:
        path = samples_file(out_dir, ref.name)
        replies = generated_replies(path) if path else {}
        if replies:
            lengths = [len(tokenizer(r["reply"], add_special_tokens=False)["input_ids"]) for r in replies.values()]
            rows.append({"task": ref.name, "metric": "reply_tokens", "value": sum(lengths) / len(lengths),
                         "stderr": None, "samples": None})
    return rows


def preference_rows(model, tokenizer, pairs: list[dict], out_dir: Path, run: RunDir, batch_size: int):
    from posttrain.logprobs import preference_records

    records = preference_records(model, tokenizer, pairs, batch_size)
    path = out_dir / PREFERENCE_FILE
    run.area.write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    rel = str(path.relative_to(run.root))
    return [{"task": "preferences", "metric": metric, "value": sum(r[metric] for r in records) / len(records),
             "stderr": None, "samples": rel} for metric in ("pref_acc", "margin")]


def external_source(recipe: Recipe, name_or_path: str) -> ModelSource:
    return ModelSource.of(recipe.model, name=name_or_path)


def eval_key(identity: str, seed: int | None, recipe: Recipe, setup: EvalSetup) -> str:
    """An evaluation's identity: the model, the eval spec (tasks, data, settings, template,
    lm-eval version), the generation seed, batching and the libraries that compute it."""
    return content_hash({"model": identity, "seed": seed, "eval_spec": setup.spec_hash,
                   "batch_size": recipe.eval.batch_size, "samples": recipe.eval.samples,
                   "versions": library_versions()})


def evaluate_cached(recipe: Recipe, pipeline: str, seed: int | None, identity: str | None, source: ModelSource,
                    run: RunDir, options: RunOptions, setup: EvalSetup, tracker) -> list[dict]:
    """Evaluate one model, or copy its evaluation from the cache (identity None: never cached)."""
    out_dir = run.eval_dir(pipeline, seed)
    entry = options.cache.eval_dir(eval_key(identity, seed, recipe, setup)) if identity else None
    label = pipeline + ("" if seed is None else f" (seed {seed})")
    if entry is not None and options.cache.claim("evals", entry.name, options.log, f" (eval {label})"):
        options.log(f"  reuse  eval {label} from the cache")
        run.area.rmtree(out_dir)
        run.area.copytree(entry / "out", out_dir)
        options.cache.touch(entry)
        rows = json.loads((entry / "eval.json").read_text())["rows"]
        rel = out_dir.relative_to(run.root)
        return [{**row, "pipeline": pipeline, "seed": seed, "eval_spec": setup.spec_hash,
                 "samples": str(rel / row["samples"]) if row.get("samples") else None} for row in rows]
    rows = evaluate_source(recipe, pipeline, seed, source, run, options, setup)
    tracker.log_eval(pipeline, seed, rows)
    if entry is not None:
        tmp = entry.with_name(f".tmp-{entry.name}-{os.getpid()}")
        options.cache.area.rmtree(tmp)
        options.cache.area.copytree(out_dir, tmp / "out")
        rel = out_dir.relative_to(run.root)
        stored = [{**row, "samples": str(Path(row["samples"]).relative_to(rel)) if row.get("samples") else None}
                  for row in rows]
        options.cache.area.write_json(tmp / "eval.json", {"label": label, "model": identity, "rows": stored})
        write_manifest(options.cache.area, tmp)
        options.cache.area.publish(tmp, entry)
    return rows


def evaluate_plan(plan: Plan, run: RunDir, options: "RunOptions", setup: EvalSetup, tracker) -> list[dict]:
    """Every pipeline's final model once per seed, the base model once, then the external
    models; the result rows in that order."""
    recipe = plan.recipe
    rows: list[dict] = []
    for (pipeline, seed), node in plan.finals.items():
        if node is None and seed != recipe.seeds[0]:
            continue  # an untrained model does not depend on the training seed
        eval_seed = None if node is None else seed
        identity = plan.base_key if node is None else node.key
        rows += evaluate_cached(recipe, pipeline, eval_seed, identity, source_after(plan, node, options.cache),
                                run, options, setup, tracker)
    for name, model in recipe.external.items():
        # External models are named, not content-addressed (a hub id or folder can change): never cached.
        rows += evaluate_cached(recipe, name, None, None, external_source(recipe, model), run, options, setup,
                                tracker)
    return rows
