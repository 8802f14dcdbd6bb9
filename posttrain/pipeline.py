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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from posttrain.artifacts import RunDir, library_versions, publish_dir, write_json_atomic, write_text_atomic
from posttrain.config import BASE_PIPELINE, Recipe, dump_recipe, pipelines_with_base, resolve_lora
from posttrain.data.sources import LoadedData, load_data
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


def load_stage_data(recipe: Recipe, base_dir: Path) -> dict[str, LoadedData]:
    """Each dataset once, in the kind its stages need (preference data may feed SFT)."""
    loaded: dict[tuple[str, str], LoadedData] = {}
    for stage in recipe.stages.values():
        want = STAGE_DATA_KIND[stage.method]
        if (stage.data, want) not in loaded:
            loaded[(stage.data, want)] = load_data(stage.data, recipe.data[stage.data], want, base_dir)
    return {f"{name}:{want}": data for (name, want), data in loaded.items()}


def make_plan(recipe: Recipe, base_dir: Path) -> Plan:
    data = load_stage_data(recipe, base_dir)
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


def train_node(plan: Plan, node: StageNode, run: RunDir, options: RunOptions) -> dict:
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
    ctx = StageContext(
        name=node.stage, spec=spec, seed=spec.seed if spec.seed is not None else node.seed,
        start=source_after(plan, node.parent, run), examples=node.data.examples, out_dir=tmp_dir,
        lora=resolve_lora(recipe, spec), show_progress=options.show_progress)
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


def evaluate_pipeline(plan: Plan, pipeline: str, seed: int | None, node: StageNode | None, run: RunDir,
                      options: RunOptions, task_refs, task_dir: Path) -> list[dict]:
    from posttrain.evaluate import evaluate_model
    from posttrain.models import load_model_and_tokenizer
    from posttrain.stages.common import device

    spec = plan.recipe.eval
    model, tokenizer = load_model_and_tokenizer(source_after(plan, node, run), device=device())
    model.eval()
    options.log(f"  eval   {pipeline}" + ("" if seed is None else f" (seed {seed})"))
    rows = evaluate_model(
        model, tokenizer, task_refs, task_dir=task_dir, out_dir=run.eval_dir(pipeline, seed), label=pipeline,
        apply_chat_template=spec.apply_chat_template, num_fewshot=spec.num_fewshot,
        batch_size=spec.batch_size, limit=spec.limit, max_gen_toks=spec.max_gen_toks,
        seed=seed if seed is not None else 0)
    del model
    gc.collect()
    return [{"pipeline": pipeline, "seed": seed, **row} for row in rows]


def run_recipe(recipe: Recipe, options: RunOptions) -> Path:
    """Train every pipeline (shared prefixes once), evaluate each and the base; write results."""
    from posttrain.artifacts import environment
    from posttrain.evaluate import prepare_task_dir, resolve_tasks
    from posttrain.report import write_report

    if not options.show_progress:
        os.environ.setdefault("TQDM_DISABLE", "1")  # datasets/TRL bars are noise in logs
    run = RunDir(options.out_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run.root / "recipe.resolved.yaml", dump_recipe(recipe))
    write_json_atomic(run.root / "env.json", environment())
    task_refs = resolve_tasks(recipe.eval.tasks, [options.base_dir, Path.cwd(), REPO_ROOT])
    task_dir = prepare_task_dir(task_refs, run.evals / "tasks")

    plan = make_plan(recipe, options.base_dir)
    for data in plan.data.values():
        if data.skipped:
            options.log(f"data {data.name}: skipped {len(data.skipped)} malformed rows (on_bad_rows: skip)")
    options.log(f"plan: {len(plan.nodes)} stage runs for {len(plan.finals)} (pipeline, seed) pairs")
    write_json_atomic(run.root / "pipelines.json", pipeline_stage_dirs(plan, run))
    for node in plan.nodes.values():
        train_node(plan, node, run, options)

    rows: list[dict] = []
    for (pipeline, seed), node in plan.finals.items():
        if pipeline == BASE_PIPELINE and seed != recipe.seeds[0]:
            continue  # the base model does not depend on the training seed
        rows += evaluate_pipeline(plan, pipeline, None if pipeline == BASE_PIPELINE else seed, node, run,
                                  options, task_refs, task_dir)
    write_text_atomic(run.results, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    write_report(run.root)
    return run.root
