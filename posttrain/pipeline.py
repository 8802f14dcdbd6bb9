"""Plan the stage graph of a recipe, run it, reuse finished stages, evaluate.

Pipelines are chains of stages; a stage is identified by a hash of everything that
determines its output (upstream key, its settings, its data fingerprint, the base
model, the seed, library versions). Pipelines sharing a prefix share its stages:
`sft` and `sft+dpo` train SFT once.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from posttrain.artifacts import RunDir, library_versions, publish_dir, write_json_atomic, write_text_atomic
from posttrain.config import Recipe, dump_recipe, pipelines_with_base, resolve_lora
from posttrain.data.sources import DataEnv, LoadedData, fingerprint, load_data
from posttrain.samples import PREFERENCE_FILE, generated_replies, samples_file
from posttrain.models import ModelSource

STAGE_DATA_KIND = {"sft": "instruction", "dpo": "preference", "orpo": "preference"}
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class StageNode:
    """One stage to train for one seed, after `parent` (None: from the base model)."""

    stage: str
    seed: int
    key: str
    parent: "StageNode | None"
    data: LoadedData = field(repr=False)

    @property
    def chain(self) -> list[str]:
        return (self.parent.chain if self.parent else []) + [self.stage]


@dataclass
class Plan:
    recipe: Recipe
    nodes: dict[str, StageNode]                  # key -> node, in training order
    finals: dict[tuple[str, int], StageNode | None]  # (pipeline, seed) -> last node (None: base)
    data: dict[str, LoadedData]


def base_source(recipe: Recipe) -> ModelSource:
    spec = recipe.model
    return ModelSource(name=spec.name, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code,
                       revision=spec.revision, chat_template=spec.chat_template)


def stage_key(recipe: Recipe, stage_name: str, seed: int, parent_key: str | None, data: LoadedData) -> str:
    stage = recipe.stages[stage_name]
    lora = resolve_lora(recipe, stage)
    payload = {
        "parent": parent_key,
        "base_model": recipe.model.model_dump(mode="json", exclude={"lora"}),
        "stage": stage.model_dump(mode="json", exclude={"lora", "logging_steps"}),
        "lora": lora.model_dump(mode="json") if lora else None,
        "data": data.fingerprint,
        "seed": stage.seed if stage.seed is not None else seed,
        "versions": {k: v for k, v in library_versions().items() if k not in ("lm_eval", "wandb")},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_stage_data(recipe: Recipe, env: DataEnv) -> dict[str, LoadedData]:
    """Each dataset once, in the kind its stages need (preference data may feed SFT)."""
    loaded: dict[tuple[str, str], LoadedData] = {}
    for stage in recipe.stages.values():
        want = STAGE_DATA_KIND[stage.method]
        if (stage.data, want) not in loaded:
            loaded[(stage.data, want)] = load_data(stage.data, recipe.data[stage.data], want, env)
    return {f"{name}:{want}": data for (name, want), data in loaded.items()}


def data_env(recipe: Recipe, base_dir: Path, cache_dir: Path | None = None, eval_texts=None,
             log: Callable[[str], None] = lambda line: None) -> DataEnv:
    """How datasets are loaded for this recipe: its tokenizer counts tokens, its model scores."""
    from functools import cache

    @cache
    def count_tokens():
        from posttrain.models import load_tokenizer

        tokenizer = load_tokenizer(base_source(recipe))
        return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def scorer(name: str | None):
        from posttrain.data.curate import Scorer

        source = base_source(recipe) if name is None else replace(base_source(recipe), name=name)
        return Scorer.from_source(source)

    return DataEnv(base_dir=base_dir, datasets=dict(recipe.data), count_tokens=count_tokens,
                   eval_texts=eval_texts, scorer=scorer, cache_dir=cache_dir, seed=recipe.seeds[0], log=log)


def make_plan(recipe: Recipe, env: DataEnv | Path) -> Plan:
    env = env if isinstance(env, DataEnv) else data_env(recipe, env)
    data = load_stage_data(recipe, env)
    nodes: dict[str, StageNode] = {}
    finals: dict[tuple[str, int], StageNode | None] = {}
    for pipeline, chain in pipelines_with_base(recipe).items():
        for seed in recipe.seeds:
            parent = None
            for stage_name in chain:
                stage = recipe.stages[stage_name]
                stage_data = data[f"{stage.data}:{STAGE_DATA_KIND[stage.method]}"]
                key = stage_key(recipe, stage_name, seed, parent.key if parent else None, stage_data)
                parent = nodes.setdefault(key, StageNode(stage_name, seed, key, parent, stage_data))
            finals[(pipeline, seed)] = parent
    return Plan(recipe, nodes, finals, data)


# ---------------------------------------------------------------- running


@dataclass
class RunOptions:
    out_dir: Path
    base_dir: Path                     # the recipe's folder: relative paths resolve here
    show_progress: bool = False
    log: Callable[[str], None] = print


def source_after(plan: Plan, node: StageNode | None, run: RunDir) -> ModelSource:
    """The model a pipeline has after `node`: full weights, or base + merged adapters."""
    if node is None:
        return base_source(plan.recipe)
    previous = source_after(plan, node.parent, run)
    stage_dir = run.stage_dir(node.stage, node.seed, node.key)
    info = json.loads((stage_dir / "stage.json").read_text())
    model_dir = str(stage_dir / "model")
    if info["adapter"]:
        return replace(previous, adapter_dirs=previous.adapter_dirs + (model_dir,))
    return replace(previous, name=model_dir, adapter_dirs=(), revision=None)


def train_node(plan: Plan, node: StageNode, run: RunDir, options: RunOptions, tracker) -> dict:
    """Train one stage unless a finished copy with the same key exists; return stage.json."""
    from posttrain.stages import run_stage
    from posttrain.stages.common import StageContext

    final_dir = run.stage_dir(node.stage, node.seed, node.key)
    done = final_dir / "stage.json"
    if done.is_file():
        options.log(f"  reuse  {node.stage} (seed {node.seed}) from {final_dir.relative_to(run.root)}")
        return json.loads(done.read_text())
    recipe = plan.recipe
    spec = recipe.stages[node.stage]
    tmp_dir = run.stages / f".tmp-{final_dir.name}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    options.log(f"  train  {node.stage} ({spec.method}, seed {node.seed}) on {len(node.data.examples)} "
                f"examples from {' -> '.join(node.chain[:-1]) or 'base'}")
    # One W&B run per trained stage; the trainer's own callback logs its curves into it.
    with tracker.stage(node.stage, spec.method, node.seed, spec.model_dump(mode="json")) as report_to:
        ctx = StageContext(
            name=node.stage, spec=spec, seed=spec.seed if spec.seed is not None else node.seed,
            start=source_after(plan, node.parent, run), examples=node.data.examples, out_dir=tmp_dir,
            lora=resolve_lora(recipe, spec), show_progress=options.show_progress, report_to=report_to)
        result = run_stage(ctx)
    info = {
        "stage": node.stage, "method": spec.method, "seed": node.seed, "key": node.key,
        "chain": node.chain, "parent_key": node.parent.key if node.parent else None,
        "start_model": ctx.start.name, "adapter": result.adapter,
        "settings": spec.model_dump(mode="json"), "data": {
            "name": node.data.name, "format": node.data.format, "examples": len(node.data.examples),
            "fingerprint": node.data.fingerprint, "skipped_rows": len(node.data.skipped)},
        "cost": result.cost, "metrics": result.metrics,
    }
    write_json_atomic(tmp_dir / "stage.json", info)
    publish_dir(tmp_dir, final_dir)
    options.log(f"         done in {result.cost['wall_s']:.0f}s, {result.cost['optimizer_steps']} steps, "
                + ", ".join(f"{k} {v:.3g}" for k, v in result.metrics.items() if isinstance(v, float)))
    gc.collect()
    return info


def data_summary(plan: Plan) -> dict:
    """Per dataset used: rows, format, fingerprint, skipped rows, curation report."""
    return {key: {"name": d.name, "kind": d.kind, "format": d.format, "rows": len(d.examples),
                  "fingerprint": d.fingerprint, "skipped_rows": len(d.skipped), "skipped": d.skipped[:20],
                  "rows_before_curation": d.rows_before_curation, "curation": d.curation}
            for key, d in plan.data.items()}


def progress_eta(started: float, done: int, total: int) -> str:
    """A rough ETA from the stages finished so far (stages differ in cost: rough)."""
    if done == 0:
        return ""
    elapsed = time.perf_counter() - started
    return f" elapsed {elapsed / 60:.1f} min, ~{elapsed / done * (total - done) / 60:.1f} min of training left"


def pipeline_stage_dirs(plan: Plan, run: RunDir) -> dict:
    """{pipeline: {seed: [stage dir names in order]}}: how the report sums cost."""
    out: dict[str, dict[str, list[str]]] = {}
    for (pipeline, seed), node in plan.finals.items():
        dirs = []
        while node is not None:
            dirs.insert(0, run.stage_dir(node.stage, node.seed, node.key).name)
            node = node.parent
        out.setdefault(pipeline, {})[str(seed)] = dirs
    return out


@dataclass
class EvalSetup:
    """What every evaluated model shares: tasks, their prepared copies, the spec hash."""

    refs: list
    task_dir: Path
    spec_hash: str
    preference_pairs: list[dict]


def prepare_eval(recipe: Recipe, run: RunDir, base_dir: Path) -> EvalSetup:
    from posttrain.evaluate import eval_spec_hash, prepare_task_dir, resolve_tasks
    from posttrain.models import CHATML_TEMPLATE

    refs = resolve_tasks(recipe.eval.tasks, [base_dir, Path.cwd(), REPO_ROOT])
    task_dir = prepare_task_dir(refs, run.evals / "tasks")
    pairs = []
    if recipe.eval.preferences is not None:
        pairs = load_data("eval.preferences", recipe.eval.preferences, "preference", base_dir).examples
    settings = {
        "eval": recipe.eval.model_dump(mode="json", exclude={"batch_size", "samples"}),
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
    shutil.rmtree(out_dir, ignore_errors=True)  # one set of records per evaluation
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
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    rel = str(path.relative_to(run.root))
    return [{"task": "preferences", "metric": metric, "value": sum(r[metric] for r in records) / len(records),
             "stderr": None, "samples": rel} for metric in ("pref_acc", "margin")]


def external_source(recipe: Recipe, name_or_path: str) -> ModelSource:
    return replace(base_source(recipe), name=name_or_path, revision=None)


def run_recipe(recipe: Recipe, options: RunOptions) -> Path:
    """Train every pipeline (shared prefixes once), evaluate each and the base; write results."""
    from posttrain.artifacts import environment
    from posttrain.report import main_table, write_report
    from posttrain.tracking import Tracker, WandbSettings

    if not options.show_progress:
        os.environ.setdefault("TQDM_DISABLE", "1")  # datasets/TRL bars are noise in logs
    run = RunDir(options.out_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run.root / "recipe.resolved.yaml", dump_recipe(recipe))
    write_json_atomic(run.root / "env.json", environment())
    setup = prepare_eval(recipe, run, options.base_dir)
    wandb_spec = recipe.tracking.wandb
    tracker = Tracker(WandbSettings(**wandb_spec.model_dump()) if wandb_spec else None, run.root, recipe.name,
                      log=options.log)

    from posttrain.evaluate import task_texts

    env = data_env(recipe, options.base_dir, cache_dir=run.root / "data",
                   eval_texts=lambda: task_texts(setup.refs, setup.task_dir), log=options.log)
    plan = make_plan(recipe, env)
    write_json_atomic(run.root / "data.json", data_summary(plan))
    for data in plan.data.values():
        if data.skipped:
            options.log(f"data {data.name}: skipped {len(data.skipped)} malformed rows (on_bad_rows: skip)")
    options.log(f"plan: {len(plan.nodes)} stage runs for {len(plan.finals)} (pipeline, seed) pairs")
    write_json_atomic(run.root / "pipelines.json", pipeline_stage_dirs(plan, run))
    # The ETA counts only stages that train: reused ones take no time.
    to_train = {key for key, node in plan.nodes.items()
                if not (run.stage_dir(node.stage, node.seed, node.key) / "stage.json").is_file()}
    options.log(f"{len(plan.nodes) - len(to_train)} stage runs reused, {len(to_train)} to train")
    started, trained = time.perf_counter(), 0
    for index, node in enumerate(plan.nodes.values(), 1):
        options.log(f"[stage {index}/{len(plan.nodes)}]{progress_eta(started, trained, len(to_train))}")
        train_node(plan, node, run, options, tracker)
        trained += node.key in to_train

    rows: list[dict] = []
    for (pipeline, seed), node in plan.finals.items():
        if node is None and seed != recipe.seeds[0]:
            continue  # an untrained model does not depend on the training seed
        eval_seed = None if node is None else seed
        new_rows = evaluate_source(recipe, pipeline, eval_seed, source_after(plan, node, run), run, options, setup)
        tracker.log_eval(pipeline, eval_seed, new_rows)
        rows += new_rows
    for name, model in recipe.external.items():
        new_rows = evaluate_source(recipe, name, None, external_source(recipe, model), run, options, setup)
        tracker.log_eval(name, None, new_rows)
        rows += new_rows
    write_text_atomic(run.results, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    report = write_report(run.root)
    tracker.log_report(*main_table(report), run.root / "report.html")
    return run.root
