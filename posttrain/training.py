"""Training a plan's stages: each under its key's lock, from its last checkpoint when one
exists, stopped cleanly on Ctrl-C or SIGTERM, published into the cache only when complete."""

from __future__ import annotations

import gc
import os
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from posttrain.artifacts import STAGE_RECORD, TRAINER_LOG, RunDir
from posttrain.cache import Cache, checkpoint_step, drop_incomplete_checkpoints, save_dataset, write_manifest
from posttrain.errors import Interrupted, TrainingDiverged
from posttrain.distributed import stage_layout
from posttrain.ranks import Ranks
from posttrain.plan import Plan, StageNode, resolved, source_after
from posttrain.records import Cost, StageRecord
from posttrain.recipe.schema import Recipe, resolve_lora


@dataclass
class RunOptions:
    out_dir: Path
    base_dir: Path                     # the recipe's folder: relative paths resolve here
    show_progress: bool = False
    log: Callable[[str], None] = print
    cache: Cache = field(default_factory=Cache)
    force: bool = False                # write into the run directory of another recipe
    world_size: int | None = None      # processes sharing each global batch (None: the launcher's, else 1)
    device: str | None = None          # "cuda"/"cpu" planned for (None: this machine's): resolves dtype auto
    ranks: Ranks = field(default_factory=Ranks)   # this process's place under a launcher (rank 0 writes)
    gpu_memory_gb: float | None = None # one GPU's memory planned for (None: this machine's): posttrain.defaults


def record_stage(cache: Cache, node: StageNode, run: RunDir, reused: bool) -> StageRecord:
    """The run directory's view of a cached stage: its record and curves, a link to the model."""
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
                            every_minutes=recipe.output.checkpoint_minutes, keep=recipe.output.save_total_limit)


@contextmanager
def tensorboard_dir(recipe: Recipe, run: RunDir, node: StageNode):
    """With tracking.tensorboard: the stage's curves go to <run>/tensorboard/<stage>-seed<N>
    (transformers' TensorBoard callback reads the folder from TENSORBOARD_LOGGING_DIR)."""
    if not recipe.tracking.tensorboard:
        yield []
        return
    folder = run.root / "tensorboard" / f"{node.stage}-seed{node.seed}"
    run.area.mkdir(folder)
    before = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(folder)
    try:
        yield ["tensorboard"]
    finally:
        if before is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = before


def train_node(plan: Plan, node: StageNode, run: RunDir, options: RunOptions, tracker) -> StageRecord | None:
    """Train one stage unless the cache holds its key; resume it from its last checkpoint.

    The stage trains into the cache's partial dir and is renamed into place only when
    complete, so a crash never leaves a half-written stage that looks finished. Under a
    launcher every rank trains; rank 0 alone decides (reuse, resume), holds the lock,
    writes and publishes, and the others follow its decision (posttrain.ranks); no rank
    starts the next stage before this one is published. Followers return None.
    """
    ranks = options.ranks
    with ExitStack() as held:   # rank 0's lock on the key, released once the stage is published
        start = ranks.decide(lambda: begin_stage(plan, node, options, held))
        if start is None:
            return record_stage(options.cache, node, run, reused=True) if ranks.is_main else None
        result, start_model, stopped_after = train_started(plan, node, run, options, tracker, start)
        if ranks.is_main:
            publish_stage(plan, node, options.cache, result, start_model)
    ranks.barrier()
    gc.collect()
    if not ranks.is_main:
        return None
    if stopped_after:
        record_stage(options.cache, node, run, reused=False)
        raise Interrupted(f"stopped after stage {node.stage} (seed {node.seed}) finished; "
                          "run the same command again to continue (finished stages are reused).")
    options.log(f"         done in {result.cost['wall_s']:.0f}s, {result.cost['optimizer_steps']} steps, "
                + ", ".join(f"{k} {v:.3g}" for k, v in result.metrics.items() if isinstance(v, float)))
    return record_stage(options.cache, node, run, reused=False)


def begin_stage(plan: Plan, node: StageNode, options: RunOptions, held: ExitStack) -> dict | None:
    """Rank 0: None when the cache holds the stage (reuse), else what training starts
    from, with the key's lock taken (into `held`) and the partial dir made ready."""
    cache = options.cache
    if cache.has_stage(node.key):
        options.log(f"  reuse  {node.stage} (seed {node.seed}) {node.key[:12]} from the cache")
        return None
    held.enter_context(stage_lock(cache, node, options.log))
    # Under the lock: another run may have finished it while we waited; an entry from
    # before manifests is adopted, a corrupt one is reported and removed (then trained).
    verdict = cache.claim("stages", node.key, options.log, f" ({node.stage}, seed {node.seed})")
    if verdict:
        options.log(f"  reuse  {node.stage} (seed {node.seed}) {node.key[:12]}"
                    + (", just trained by another run" if verdict.manifest else " from the cache"))
        return None
    spec = plan.recipe.stages[node.stage]
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
    return {"resume": resume, "dataset_dir": dataset_dir}


def train_started(plan: Plan, node: StageNode, run: RunDir, options: RunOptions, tracker, start: dict):
    """Every rank: train the stage from `start` (begin_stage's); the result, the model it
    started from, and whether a stop was asked for after the last step."""
    from posttrain.stages import run_stage
    from posttrain.stages.common import StageContext, StageInterrupted
    from posttrain.stages.divergence import StageDiverged

    cache, recipe = options.cache, plan.recipe
    spec = recipe.stages[node.stage]
    partial = cache.partial_dir(node.key)
    # One W&B run per trained stage; the trainer's own callback logs its curves into it. Only
    # rank 0 reports (W&B, TensorBoard under the run directory): the others pass no tracker.
    main = options.ranks.is_main
    with (tracker.stage(node.stage, spec.method, node.seed, spec.model_dump(mode="json")) if main
          else nullcontext([])) as report_to, \
            (tensorboard_dir(recipe, run, node) if main else nullcontext([])) as tensorboard:
        ctx = StageContext(
            name=node.stage, spec=spec, seed=spec.seed if spec.seed is not None else node.seed,
            start=source_after(plan, node.parent, cache), examples=node.data.examples, out_dir=partial,
            lora=resolve_lora(recipe, spec), show_progress=options.show_progress,
            report_to=list(report_to) + tensorboard, dataset_dir=start["dataset_dir"],
            start_key=node.parent.key if node.parent else plan.base_key,
            reflogps_dir=cache.root / "reflogps", checkpoint=checkpoint_policy(recipe), resume_from=start["resume"],
            eval_examples=node.eval_data.examples if node.eval_data is not None else None,
            batch=stage_layout(node.stage, spec, plan.world_size), resolved=resolved(plan, node.stage),
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
                if options.ranks.is_main:
                    cache.area.rmtree(partial)
                raise TrainingDiverged(exc.message(ctx), stage=node.stage, seed=node.seed, key=node.key,
                                       step=exc.step, details=exc.details()) from None
            return result, ctx.start.name, ctx.stop_requested()


def publish_stage(plan: Plan, node: StageNode, cache: Cache, result, start_model: str) -> None:
    """Rank 0: the stage's record, its manifest, and the partial dir renamed into place."""
    spec = plan.recipe.stages[node.stage]
    partial = cache.partial_dir(node.key)
    StageRecord(
        stage=node.stage, method=spec.method, seed=node.seed, key=node.key,
        chain=node.chain, parent_key=node.parent.key if node.parent else None,
        start_model=start_model, adapter=result.adapter,
        settings=spec.model_dump(mode="json"), data={
            "name": node.data.name, "format": node.data.format, "examples": len(node.data.examples),
            "fingerprint": node.data.fingerprint, "skipped_rows": len(node.data.skipped)},
        cost=Cost.from_json(result.cost), metrics=result.metrics, key_inputs=node.inputs,
        resolved=resolved(plan, node.stage),
    ).write(cache.area, partial / STAGE_RECORD)
    cache.area.unlink(partial / "pending.json")
    write_manifest(cache.area, partial)  # sizes and SHA-256: reuse verifies, never trusts
    cache.area.publish(partial, cache.stage_dir(node.key))


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


def progress_eta(started: float, done: int, total: int) -> str:
    """A rough ETA from the stages finished so far (stages differ in cost: rough)."""
    if done == 0:
        return ""
    elapsed = time.perf_counter() - started
    return f" elapsed {elapsed / 60:.1f} min, ~{elapsed / done * (total - done) / 60:.1f} min of training left"


def train_plan(plan: Plan, rows_of_plan: list[dict], run: RunDir, options: RunOptions, tracker) -> None:
    """Every stage of the plan in training order (reused ones are recorded, not trained);
    a diverged stage's failure is written to the run directory before it is raised."""
    to_train = {row["key"] for row in rows_of_plan if row["status"] != "reuse"}
    started, trained = time.perf_counter(), 0
    for index, node in enumerate(plan.nodes.values(), 1):
        options.log(f"[stage {index}/{len(plan.nodes)}]{progress_eta(started, trained, len(to_train))}")
        try:
            train_node(plan, node, run, options, tracker)
        except TrainingDiverged as exc:
            run.area.write_json(run.failed, exc.record())  # which stage failed, for the user and scripts
            raise
        trained += node.key in to_train
