"""Plan the stage graph of a recipe, run it, reuse finished stages, evaluate.

Pipelines are chains of stages; a stage is identified by a hash of everything that
determines its output (upstream key, its settings, its data fingerprint, the base
model, the seed, library versions). Pipelines sharing a prefix share its stages:
`sft` and `sft+dpo` train SFT once.
"""

from __future__ import annotations

import gc
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from posttrain.artifacts import RunDir, content_hash, library_versions
from posttrain.cache import Cache, checkpoint_step, drop_incomplete_checkpoints, save_dataset, write_manifest
from posttrain.recipe.schema import Recipe, dump_recipe, pipelines_with_base, resolve_lora
from posttrain.errors import DataError, Interrupted, TrainingDiverged
from posttrain.data.sources import DataEnv, LoadedData, fingerprint, load_data
from posttrain.samples import PREFERENCE_FILE, generated_replies, samples_file
from posttrain.models import ModelSource
from posttrain.stages import METHODS

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class StageNode:
    """One stage to train for one seed, after `parent` (None: from the base model)."""

    stage: str
    seed: int
    key: str
    parent: "StageNode | None"
    data: LoadedData = field(repr=False)
    inputs: dict = field(default_factory=dict, repr=False)   # what the key hashes (stage_key_inputs)

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
    return ModelSource.of(recipe.model)


def base_key(recipe: Recipe) -> str:
    """Identity of the untrained model (weights by name and revision; template and dtype)."""
    return content_hash({"base_model": recipe.model.model_dump(mode="json", exclude={"lora"})})


def stage_key(recipe: Recipe, stage_name: str, seed: int, parent_key: str | None, data: LoadedData) -> str:
    return content_hash(stage_key_inputs(recipe, stage_name, seed, parent_key, data))


def stage_key_inputs(recipe: Recipe, stage_name: str, seed: int, parent_key: str | None,
                     data: LoadedData) -> dict:
    """Everything a stage's key hashes; recorded in stage.json so `plan` can say what changed."""
    stage = recipe.stages[stage_name]
    lora = resolve_lora(recipe, stage)
    return {
        "parent": parent_key,
        "base_model": recipe.model.model_dump(mode="json", exclude={"lora"}),
        "stage": stage.key_settings(),
        "lora": lora.model_dump(mode="json") if lora else None,
        "data": data.fingerprint,
        "seed": stage.seed if stage.seed is not None else seed,
        "versions": {k: v for k, v in library_versions().items() if k not in ("lm_eval", "wandb")},
    }


# What each input of a stage key is called when `plan` says why a stage trains again.
KEY_INPUT_NAMES = {"parent": "upstream stage", "base_model": "base model", "stage": "settings", "lora": "LoRA",
                   "data": "data fingerprint", "seed": "seed", "versions": "library versions"}


def key_changes(before: dict, now: dict) -> list[str]:
    """Which inputs of a stage key differ between an earlier stage and now, readably."""
    changes = []
    for name, label in KEY_INPUT_NAMES.items():
        old, new = before.get(name), now.get(name)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            fields = [f"{k} {old.get(k, '-')} -> {new.get(k, '-')}" for k in sorted({*old, *new})
                      if old.get(k) != new.get(k)]
            changes.append(f"{label}: {', '.join(fields)}")
        elif name in ("parent", "data"):
            changes.append(f"{label} changed ({str(old)[:12]} -> {str(new)[:12]})")
        else:
            changes.append(f"{label}: {old} -> {new}")
    return changes


def why_trains(cache: Cache, node: StageNode) -> str | None:
    """Why `node` trains although a stage of the same name and seed is in the cache:
    the inputs of its key that changed since the most recently used such stage."""
    from posttrain.cache import last_used, read_json

    folder = cache.root / "stages"
    candidates = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        info = read_json(entry / "stage.json") if not entry.name.startswith(".") else None
        if isinstance(info, dict) and info.get("stage") == node.stage and info.get("seed") == node.seed:
            candidates.append((info.get("chain") == node.chain, last_used(entry), info))
    if not candidates:
        return None
    _, _, info = max(candidates, key=lambda c: (c[0], c[1]))
    before = info.get("key_inputs")
    if not isinstance(before, dict):
        return f"differs from cached {str(info.get('key'))[:12]} (which predates recorded key inputs)"
    changes = key_changes(before, node.inputs)
    return "; ".join(changes) if changes else None


def data_key(stage) -> str:
    """Where a stage's data is in `load_stage_data`'s result: the dataset in its method's kind."""
    return f"{stage.data}:{METHODS[stage.method].data}"


def load_stage_data(recipe: Recipe, env: DataEnv) -> dict[str, LoadedData]:
    """Each dataset once, in the kind its stages need (preference data may feed SFT)."""
    loaded: dict[tuple[str, str], LoadedData] = {}
    problems = []
    for stage_name, stage in recipe.stages.items():
        want = METHODS[stage.method].data
        if (stage.data, want) not in loaded:
            loaded[(stage.data, want)] = load_data(stage.data, recipe.data[stage.data], want, env)
        data = loaded[(stage.data, want)]
        if not data.examples:
            after = (f" after curation (it had {data.rows_before_curation:,} rows)"
                     if data.rows_before_curation else "")
            problems.append(f"data.{stage.data}: no rows{after}; stages.{stage_name} has nothing to train on")
    if problems:
        raise DataError("nothing to train on", problems)
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


def make_plan(recipe: Recipe, env: DataEnv | Path, data: dict[str, LoadedData] | None = None) -> Plan:
    env = env if isinstance(env, DataEnv) else data_env(recipe, env)
    data = data if data is not None else load_stage_data(recipe, env)
    nodes: dict[str, StageNode] = {}
    finals: dict[tuple[str, int], StageNode | None] = {}
    for pipeline, chain in pipelines_with_base(recipe).items():
        for seed in recipe.seeds:
            parent = None
            for stage_name in chain:
                stage = recipe.stages[stage_name]
                stage_data = data[data_key(stage)]
                inputs = stage_key_inputs(recipe, stage_name, seed, parent.key if parent else None, stage_data)
                key = content_hash(inputs)
                parent = nodes.setdefault(key, StageNode(stage_name, seed, key, parent, stage_data, inputs))
            finals[(pipeline, seed)] = parent
    return Plan(recipe, nodes, finals, data)


# ---------------------------------------------------------------- running


@dataclass
class RunOptions:
    out_dir: Path
    base_dir: Path                     # the recipe's folder: relative paths resolve here
    show_progress: bool = False
    log: Callable[[str], None] = print
    cache: Cache = field(default_factory=Cache)
    force: bool = False                # write into the run directory of another recipe


def source_after(plan: Plan, node: StageNode | None, cache: Cache) -> ModelSource:
    """The model a pipeline has after `node`: full weights, or base + merged adapters."""
    if node is None:
        return base_source(plan.recipe)
    previous = source_after(plan, node.parent, cache)
    info = cache.stage_info(node.key)
    model_dir = str(cache.stage_dir(node.key) / "model")
    if info["adapter"]:
        return replace(previous, adapter_dirs=previous.adapter_dirs + (model_dir,))
    return replace(previous, name=model_dir, adapter_dirs=(), revision=None)


def record_stage(cache: Cache, node: StageNode, run: RunDir, reused: bool):
    """The run directory's view of a cached stage (a records.StageRecord): its stage.json
    and curves, a link to the model."""
    from posttrain.artifacts import TRAINER_LOG

    entry = cache.stage_dir(node.key)
    cache.touch(entry)
    record = replace(cache.stage_record(node.key), cache_dir=str(entry), reused=reused)
    folder = run.area.mkdir(run.stage_dir(node.stage, node.seed, node.key))
    record.write(run.area, run.stage_record(folder.name))
    if (entry / TRAINER_LOG).is_file():
        run.area.copyfile(entry / TRAINER_LOG, run.trainer_log(folder.name))
    run.area.symlink(folder / "model", entry / "model")
    return record


@contextmanager
def stage_lock(cache: Cache, node: StageNode, log):
    """Hold the key's training lock; say so when another run holds it."""
    from filelock import Timeout

    lock = cache.lock(node.key)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"  wait   {node.stage} (seed {node.seed}): another posttrain process is training it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def checkpoint_policy(recipe: Recipe):
    from posttrain.stages.common import CheckpointPolicy

    return CheckpointPolicy(every_steps=recipe.output.checkpoint_steps,
                            every_minutes=recipe.output.checkpoint_minutes)


def train_node(plan: Plan, node: StageNode, run: RunDir, options: RunOptions, tracker) -> dict:
    """Train one stage unless the cache holds its key; resume it from its last checkpoint.

    The stage trains into the cache's partial dir and is renamed into place only when
    complete, so a crash never leaves a half-written stage that looks finished.
    """
    from posttrain.stages import run_stage
    from posttrain.stages.common import StageContext, StageDiverged, StageInterrupted

    cache = options.cache
    if cache.has_stage(node.key):
        options.log(f"  reuse  {node.stage} (seed {node.seed}) {node.key[:12]} from the cache")
        return record_stage(cache, node, run, reused=True)
    with stage_lock(cache, node, options.log):
        # Under the lock: another run may have finished it while we waited; an entry from
        # before manifests is adopted, a corrupt one is reported and removed (then trained).
        verdict = cache.claim("stages", node.key, options.log, f" ({node.stage}, seed {node.seed})")
        if verdict:
            options.log(f"  reuse  {node.stage} (seed {node.seed}) {node.key[:12]}"
                        + (", just trained by another run" if verdict.manifest else " from the cache"))
            return record_stage(cache, node, run, reused=True)
        recipe = plan.recipe
        spec = recipe.stages[node.stage]
        partial = cache.partial_dir(node.key)
        resume = cache.resume_checkpoint(node.key, options.log)  # a damaged checkpoint is skipped, said so
        if resume is None:
            cache.area.rmtree(partial)
        else:
            drop_incomplete_checkpoints(partial / "trainer")
        cache.area.mkdir(partial)
        cache.area.write_json(partial / "pending.json", {"stage": node.stage, "method": spec.method, "seed": node.seed,
                                                     "key": node.key, "chain": node.chain})
        dataset_dir = save_dataset(node.data.examples, cache.dataset_dir(node.data.fingerprint), options.log)
        where = f"resume from step {checkpoint_step(resume)}" if resume else "train"
        options.log(f"  {where}  {node.stage} ({spec.method}, seed {node.seed}) on {len(node.data.examples)} "
                    f"examples from {' -> '.join(node.chain[:-1]) or 'base'}")
        # One W&B run per trained stage; the trainer's own callback logs its curves into it.
        with tracker.stage(node.stage, spec.method, node.seed, spec.model_dump(mode="json")) as report_to:
            ctx = StageContext(
                name=node.stage, spec=spec, seed=spec.seed if spec.seed is not None else node.seed,
                start=source_after(plan, node.parent, cache), examples=node.data.examples, out_dir=partial,
                lora=resolve_lora(recipe, spec), show_progress=options.show_progress, report_to=report_to,
                dataset_dir=dataset_dir, start_key=node.parent.key if node.parent else base_key(recipe),
                reflogps_dir=cache.root / "reflogps", checkpoint=checkpoint_policy(recipe), resume_from=resume,
            )
            with stop_on_signals(options.log) as ctx.stop_requested:
                try:
                    result = run_stage(ctx)
                except StageInterrupted as exc:
                    raise Interrupted(
                        f"stage {node.stage} (seed {node.seed}) stopped at step {exc.step}/{exc.max_steps}; "
                        f"checkpoint saved under {partial}. Run the same command again to resume it "
                        "(finished stages are reused).") from None
                except StageDiverged as exc:
                    # Nothing of a diverged attempt is published or resumed from: a re-run trains afresh.
                    cache.area.rmtree(partial)
                    raise TrainingDiverged(exc.message(ctx), stage=node.stage, seed=node.seed, key=node.key,
                                           step=exc.step, details=exc.details()) from None
                stopped_after = ctx.stop_requested()
        from posttrain.artifacts import STAGE_RECORD
        from posttrain.records import Cost, StageRecord

        StageRecord(
            stage=node.stage, method=spec.method, seed=node.seed, key=node.key,
            chain=node.chain, parent_key=node.parent.key if node.parent else None,
            start_model=ctx.start.name, adapter=result.adapter,
            settings=spec.model_dump(mode="json"), data={
                "name": node.data.name, "format": node.data.format, "examples": len(node.data.examples),
                "fingerprint": node.data.fingerprint, "skipped_rows": len(node.data.skipped)},
            cost=Cost.from_json(result.cost), metrics=result.metrics, key_inputs=node.inputs,
        ).write(cache.area, partial / STAGE_RECORD)
        cache.area.unlink(partial / "pending.json")
        write_manifest(cache.area, partial)  # sizes and SHA-256: reuse verifies, never trusts
        cache.area.publish(partial, cache.stage_dir(node.key))
    if stopped_after:
        record_stage(cache, node, run, reused=False)
        raise Interrupted(f"stopped after stage {node.stage} (seed {node.seed}) finished; "
                          "run the same command again to continue (finished stages are reused).")
    options.log(f"         done in {result.cost['wall_s']:.0f}s, {result.cost['optimizer_steps']} steps, "
                + ", ".join(f"{k} {v:.3g}" for k, v in result.metrics.items() if isinstance(v, float)))
    gc.collect()
    return record_stage(cache, node, run, reused=False)


@contextmanager
def stop_on_signals(log):
    """First Ctrl-C (or SIGTERM, as schedulers send before preempting) asks the running
    stage to checkpoint and stop at the next step; a second Ctrl-C aborts at once."""
    import signal
    import threading

    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        log("\nstopping at the next step boundary to save a checkpoint (Ctrl-C again to abort now)")

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield requested.is_set
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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
    from posttrain.evaluate import eval_spec_hash, prepare_task_dir, resolve_tasks, task_search_dirs
    from posttrain.models import CHATML_TEMPLATE

    refs = resolve_tasks(recipe.eval.tasks, task_search_dirs(base_dir))
    task_dir = prepare_task_dir(refs, run.evals / "tasks", run.area)
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


def prepare_run(recipe: Recipe, options: RunOptions, run: RunDir) -> tuple[Plan, EvalSetup, dict]:
    """Everything before training: checks, eval tasks, data (curated, cached), compute matching, the plan."""
    from posttrain.checks import check_before_training, check_max_lengths, check_static
    from posttrain.evaluate import task_texts
    from posttrain.models import chat_tokenizer

    check_static(recipe, options.base_dir)   # again here for callers other than the CLI; milliseconds
    options.cache.ensure()  # (the CLI did already) a folder of the user's is never written into
    setup = prepare_eval(recipe, run, options.base_dir)
    check_before_training(recipe, setup.refs, setup.task_dir, options.log)
    env = data_env(recipe, options.base_dir, cache_dir=options.cache.curated_dir(),
                   eval_texts=lambda: task_texts(setup.refs, setup.task_dir), log=options.log)
    data = load_stage_data(recipe, env)
    tokenizer = chat_tokenizer(base_source(recipe))   # loaded once for both
    estimates = stage_estimates(recipe, data, tokenizer)
    check_max_lengths(recipe, data, options.log, tokenizer)   # no stage whose max_length leaves nothing to train
    matching = None
    if recipe.compare is not None:
        recipe, estimates, matching = match_compute(recipe, data, estimates)
    plan = make_plan(recipe, env, data)
    return plan, setup, {"estimates": estimates, "compute_match": matching}


def stage_estimates(recipe: Recipe, data: dict[str, LoadedData], tokenizer=None) -> dict[str, dict]:
    """Per stage name: examples, steps and train tokens before it runs (seed-independent).
    `tokenizer`: the recipe's chat tokenizer (`models.chat_tokenizer`), loaded when not given."""
    from posttrain.estimate import chat_token_counter, estimate_stage, truncation
    from posttrain.models import chat_tokenizer

    count = chat_token_counter(tokenizer or chat_tokenizer(base_source(recipe)))
    used = {name for chain in recipe.pipelines.values() for name in chain}
    # Per dataset and cut: DPO and ORPO on one dataset count it once.
    per_epoch: dict[tuple[str, int | None], int] = {}
    estimates = {}
    for name, spec in recipe.stages.items():
        if name in used:
            key = data_key(spec)
            counted = (key, truncation(spec))
            estimate = estimate_stage(spec, data[key].examples, count, per_epoch.get(counted))
            per_epoch[counted] = estimate.tokens_per_epoch
            estimates[name] = estimate.as_dict()
    return estimates


def match_compute(recipe: Recipe, data: dict[str, LoadedData],
                  estimates: dict[str, dict]) -> tuple[Recipe, dict[str, dict], dict]:
    """compare.match: tokens — give single-step pipelines the reference pipeline's train tokens.

    Returns the recipe with the matched stages' max_steps set, the estimates updated for
    them (their per-epoch token counts are reused, not counted again), and the notes.
    """
    from posttrain.recipe.references import matched_pipelines
    from posttrain.estimate import StageEstimate, estimate_stage, match_steps

    reference, matched = matched_pipelines(recipe)
    target = sum(estimates[name]["tokens"] for name in recipe.pipelines[reference])
    stages, estimates = dict(recipe.stages), dict(estimates)
    notes = {}
    for pipeline in matched:
        (stage_name,) = recipe.pipelines[pipeline]
        before = StageEstimate(**estimates[stage_name])
        steps = match_steps(target, before)
        spec = stages[stage_name] = stages[stage_name].model_copy(update={"max_steps": steps})
        examples = data[data_key(spec)].examples
        estimates[stage_name] = estimate_stage(spec, examples, None, before.tokens_per_epoch).as_dict()
        notes[pipeline] = {"stage": stage_name, "max_steps": steps, "was_steps": before.steps,
                           "target_tokens": target}
    return (recipe.model_copy(update={"stages": stages}), estimates,
            {"match": "tokens", "reference": reference, "pipelines": notes})


def plan_rows(plan: Plan, cache: Cache, estimates: dict[str, dict]) -> list[dict]:
    """The stage graph in training order: what runs, what is reused, keys and sizes."""
    rows = []
    for node in plan.nodes.values():
        verdict = cache.verify("stages", node.key)  # a corrupt entry is retrained, never used
        corrupt = verdict.problems if verdict else []
        if verdict is not None and not corrupt:
            status = "reuse"
        elif corrupt:
            status = "train (corrupt)"
        else:
            checkpoint = cache.resume_checkpoint(node.key)
            status = f"resume@{checkpoint_step(checkpoint)}" if checkpoint else "train"
        spec = plan.recipe.stages[node.stage]
        rows.append({"status": status, "stage": node.stage, "method": spec.method, "seed": node.seed,
                     "key": node.key, "after": " -> ".join(node.chain[:-1]) or "base",
                     "why": ("the cached entry is corrupt: " + "; ".join(corrupt) if corrupt
                             else why_trains(cache, node) if status == "train" else None),
                     **estimates.get(node.stage, {})})
    return rows


def format_plan(plan: Plan, rows: list[dict], info: dict) -> str:
    """The plan as text: a table of stages, then pipelines and compute matching."""
    header = ["status", "stage", "seed", "key", "after", "examples", "steps", "~tokens"]
    table = [[r["status"], f"{r['stage']} ({r['method']})", str(r["seed"]), r["key"][:12], r["after"],
              f"{r.get('examples', 0):,}", f"{r.get('steps', 0):,}", f"{r.get('tokens', 0):,}"] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    for r in rows:
        if r.get("why"):
            lines.append(f"  why {r['stage']} (seed {r['seed']}) trains again: {r['why']}")
    todo = [r for r in rows if r["status"] != "reuse"]
    lines.append(f"\n{len(rows)} stage runs: {len(rows) - len(todo)} reused from the cache, {len(todo)} to train "
                 f"(~{sum(r.get('steps', 0) for r in todo):,} steps, ~{sum(r.get('tokens', 0) for r in todo):,} "
                 "tokens)")
    evals = len({p for p, _ in plan.finals}) - 1
    lines.append(f"evaluations: base + {evals} pipeline(s) x {len(plan.recipe.seeds)} seed(s)"
                 + (f" + {len(plan.recipe.external)} external" if plan.recipe.external else ""))
    matching = info.get("compute_match")
    if matching:
        for pipeline, note in matching["pipelines"].items():
            lines.append(f"compute matching: {pipeline}: {note['stage']}.max_steps = {note['max_steps']} "
                         f"(was {note['was_steps']}) to match {matching['reference']}'s "
                         f"~{note['target_tokens']:,} train tokens")
    return "\n".join(lines)


def plan_recipe(recipe: Recipe, options: RunOptions) -> dict:
    """What `posttrain plan` / `run --dry-run` show; loads (and curates) data, trains nothing."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        plan, _setup, info = prepare_run(recipe, options, RunDir(Path(scratch)))
        rows = plan_rows(plan, options.cache, info["estimates"])
        return {"cache": str(options.cache.root), "stages": rows, "compute_match": info["compute_match"],
                "pipelines": {f"{pipeline}/{seed}": node.key if node else None
                              for (pipeline, seed), node in plan.finals.items()},
                "text": format_plan(plan, rows, info)}


def run_recipe(recipe: Recipe, options: RunOptions) -> Path:
    """Train every pipeline (shared prefixes once), evaluate each and the base; write results."""
    from posttrain.artifacts import environment
    from posttrain.report import main_table, write_report
    from posttrain.tracking import Tracker, WandbSettings

    if not options.show_progress:
        os.environ.setdefault("TQDM_DISABLE", "1")  # datasets/TRL bars are noise in logs
    run = RunDir(options.out_dir)
    run.claim(recipe.name, force=options.force)
    run.area.write_json(run.env, environment())
    wandb_spec = recipe.tracking.wandb
    tracker = Tracker(WandbSettings(**wandb_spec.model_dump()) if wandb_spec else None, run.root, recipe.name,
                      log=options.log)

    plan, setup, info = prepare_run(recipe, options, run)
    recipe = plan.recipe  # after compute matching
    run.area.write_text(run.recipe, dump_recipe(recipe))
    rows_of_plan = plan_rows(plan, options.cache, info["estimates"])
    run.area.write_json(run.plan, {"cache": str(options.cache.root), "stages": rows_of_plan,
                                   "compute_match": info["compute_match"]})
    run.area.write_json(run.data, data_summary(plan))
    for data in plan.data.values():
        if data.skipped:
            options.log(f"data {data.name}: skipped {len(data.skipped)} malformed rows (on_bad_rows: skip)")
    for pipeline, note in ((info["compute_match"] or {}).get("pipelines") or {}).items():
        options.log(f"compute matching: {pipeline} trains {note['max_steps']} steps to match "
                    f"{info['compute_match']['reference']}'s ~{note['target_tokens']:,} tokens")
    run.area.write_json(run.pipelines, pipeline_stage_dirs(plan, run))
    to_train = {row["key"] for row in rows_of_plan if row["status"] != "reuse"}
    resumes = [f"{row['stage']} (seed {row['seed']}) from step {row['status'].split('@')[1]}"
               for row in rows_of_plan if row["status"].startswith("resume@")]
    options.log(f"plan: {len(plan.nodes)} stage runs for {len(plan.finals)} (pipeline, seed) pairs; "
                f"{len(plan.nodes) - len(to_train)} reused from {options.cache.root}, {len(to_train)} to train"
                + (f" (resuming {', '.join(resumes)})" if resumes else ""))
    for row in rows_of_plan:
        if row.get("why"):
            options.log(f"  {row['stage']} (seed {row['seed']}) trains again: {row['why']}")
    started, trained = time.perf_counter(), 0
    for index, node in enumerate(plan.nodes.values(), 1):
        options.log(f"[stage {index}/{len(plan.nodes)}]{progress_eta(started, trained, len(to_train))}")
        try:
            train_node(plan, node, run, options, tracker)
        except TrainingDiverged as exc:
            run.area.write_json(run.failed, exc.record())  # which stage failed, for the user and scripts
            raise
        trained += node.key in to_train

    rows: list[dict] = []
    for (pipeline, seed), node in plan.finals.items():
        if node is None and seed != recipe.seeds[0]:
            continue  # an untrained model does not depend on the training seed
        eval_seed = None if node is None else seed
        identity = base_key(recipe) if node is None else node.key
        rows += evaluate_cached(recipe, pipeline, eval_seed, identity, source_after(plan, node, options.cache),
                                run, options, setup, tracker)
    for name, model in recipe.external.items():
        # External models are named, not content-addressed (a hub id or folder can change): never cached.
        rows += evaluate_cached(recipe, name, None, None, external_source(recipe, model), run, options, setup,
                                tracker)
    from posttrain.records import ResultRow, write_results

    write_results(run.area, run.results, [ResultRow.from_json(row) for row in rows])
    report = write_report(run.root)
    tracker.log_report(*main_table(report), run.report_html)
    run.area.unlink(run.failed)  # an earlier attempt's failure, fixed now
    return run.root
