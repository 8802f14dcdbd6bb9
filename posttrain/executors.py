"""`posttrain run --executor slurm`: a recipe as cluster jobs, through submitit.

The submitting process checks the recipe, claims the run directory and submits: one
CPU job that prepares the data and writes the plan, one job per stage node of the
recipe's stage graph (a distinct chain prefix and seed) depending (`afterok`) on the
preparation and on its parent stage's job, and an evaluation and report job depending
on every stage job. It prints the job ids and returns. Each stage job plans again from
the shared cache (curated data are cached, so this is cheap) and trains exactly its
node through `training.train_node`: a stage already in the cache is reused at once, an
unfinished one resumes from its checkpoint. The stage cache is the only shared state,
so it must live on a filesystem every node sees; its locks hold there (posttrain.locks).

submitit's `local` and `debug` executors have no job dependencies: with them a job is
submitted only once its dependencies have finished, so the same code runs end to end
on one machine (the tests do).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from posttrain.cluster import StageJobSpec, job_resources, stage_device, stage_graph
from posttrain.errors import Interrupted, PosttrainError, TrainingDiverged
from posttrain.recipe.fields import time_minutes
from posttrain.recipe.schema import Recipe

EXECUTORS = ("local", "slurm")          # `posttrain run --executor`; local: today's single process
# submitit sends the job USR2 this long before its time limit: the stage finishes its
# step and saves a checkpoint in that time, then the job is requeued (submitit's default: 90 s).
SIGNAL_DELAY_S = 180


def executor_parameters(resources: dict, name: str, cluster: str, per_gpu_tasks: bool = True) -> dict:
    """submitit's parameters for a job (AutoExecutor names; slurm_* only reach SLURM). A stage
    job runs one task per GPU, each exporting the torch.distributed environment; the data
    and evaluation jobs (`per_gpu_tasks` False) are one process on one node and at most one
    GPU, whatever the recipe's defaults for training say: a second task would prepare or
    evaluate everything once more, into the same run directory."""
    gpus = resources["gpus"] if per_gpu_tasks else min(resources["gpus"], 1)
    nodes = resources.get("nodes", 1) if per_gpu_tasks else 1
    params = {"name": name, "timeout_min": time_minutes(resources["time"]), "nodes": nodes,
              "tasks_per_node": max(gpus, 1), "cpus_per_task": resources.get("cpus"),
              "mem_gb": resources.get("mem_gb")}
    if cluster == "slurm":
        params.update(gpus_per_node=gpus or None, slurm_signal_delay_s=SIGNAL_DELAY_S,
                      **{f"slurm_{key}": resources.get(key) for key in ("partition", "account", "qos", "constraint")})
    return {key: value for key, value in params.items() if value is not None}


# ---------------------------------------------------------------- the jobs


@dataclass(frozen=True)
class RunSpec:
    """What every job needs to rebuild the run on its node (pickled by submitit)."""

    recipe: Recipe
    out_dir: str
    base_dir: str
    cache_root: str
    # The device the stage jobs train on, for the jobs that plan stages they do not train
    # (data, evaluation: maybe on a CPU node): `model.dtype: auto` resolves by it, and
    # with it every stage key. A stage job plans for its own machine.
    device: str | None = None

    def options(self, own_device: bool = False):
        from posttrain.cache import Cache
        from posttrain.training import RunOptions

        os.environ.setdefault("TQDM_DISABLE", "1")  # bars are noise in a job's log
        return RunOptions(out_dir=Path(self.out_dir), base_dir=Path(self.base_dir),
                          log=lambda line: print(line, flush=True), cache=Cache(Path(self.cache_root)),
                          force=True, device=None if own_device else self.device)


def prepare_job(spec: RunSpec) -> int:
    """Curate and tokenise the data, set up the evaluation tasks, write the plan: what every
    later job reads from the cache. Returns the number of stage runs planned."""
    from posttrain.artifacts import RunDir, environment
    from posttrain.pipeline import prepare_run, record_plan

    options = spec.options()
    run = RunDir(options.out_dir)
    run.area.write_json(run.env, environment())
    plan, _setup, info = prepare_run(spec.recipe, options, run)
    record_plan(plan, info, run, options)
    return len(plan.nodes)


def node_of(plan, job: StageJobSpec):
    """The plan's node for a chain prefix and seed: walked down from a pipeline it starts."""
    for (pipeline, seed), final in plan.finals.items():
        chain = plan.recipe.pipelines.get(pipeline, [])
        if seed == job.seed and tuple(chain[:len(job.prefix)]) == job.prefix and final is not None:
            node = final
            for _ in range(len(chain) - len(job.prefix)):
                node = node.parent
            return node
    raise PosttrainError(f"stage job {job.label}: the recipe has no such stage run (was it edited since?)")


class StageJob:
    """Train one stage node. Checkpointable in submitit's sense (its `checkpoint` says what
    to run when requeued on preemption or timeout): the requeued job resumes the stage from
    the checkpoint it saved."""

    def __init__(self, spec: RunSpec, job: StageJobSpec):
        self.spec, self.job = spec, job

    def __call__(self) -> str:
        from posttrain.artifacts import RunDir
        from posttrain.pipeline import make_tracker, plan_in_scratch
        from posttrain.ranks import this_process
        from posttrain.training import train_node

        export_distributed()
        options = self.spec.options(own_device=True)
        options.ranks = ranks = this_process()   # one task per GPU: rank 0 writes (posttrain.ranks)
        if not ranks.is_main:
            options.log = lambda line: None
        run = RunDir(options.out_dir)
        # Planning again is cheap (curated data come from the cache); the data job wrote the
        # run directory's eval tasks already.
        plan = plan_in_scratch(self.spec.recipe, options)
        node = node_of(plan, self.job)
        tracker = make_tracker(plan.recipe, run, options) if ranks.is_main else None
        with requeue_on_preemption() as preemption:
            try:
                train_node(plan, node, run, options, tracker)
            except TrainingDiverged as exc:
                if ranks.is_main:
                    run.area.write_json(run.failed, exc.record())   # which stage failed, as a local run says
                raise
            except Interrupted:
                if preemption is not None and preemption.preempted:
                    preemption.requeue()   # checkpoint saved: submitit requeues this job and exits
                raise
        return node.key

    def checkpoint(self):
        """What submitit resubmits on requeue: the same stage; it resumes from the cache."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(StageJob(self.spec, self.job))


def evaluate_job(spec: RunSpec) -> str:
    """Evaluate every pipeline and the base, write results and the report (every stage is in
    the cache by now: this job runs after all stage jobs succeeded)."""
    from posttrain.artifacts import RunDir
    from posttrain.evaluation import evaluate_plan
    from posttrain.pipeline import make_tracker, prepare_run
    from posttrain.records import ResultRow, write_results
    from posttrain.report import main_table, write_report

    options = spec.options()
    run = RunDir(options.out_dir)
    plan, setup, _info = prepare_run(spec.recipe, options, run)
    missing = [f"{node.stage} (seed {node.seed})" for node in plan.nodes.values()
               if not options.cache.has_stage(node.key)]
    if missing:
        raise PosttrainError(f"evaluation: stages not in the cache {options.cache.root}: {', '.join(missing)}; "
                             "submit the recipe again to train them")
    tracker = make_tracker(plan.recipe, run, options)
    rows = evaluate_plan(plan, run, options, setup, tracker)
    write_results(run.area, run.results, [ResultRow.from_json(row) for row in rows])
    report = write_report(run.root)
    tracker.log_report(*main_table(report), run.report_html)
    run.area.unlink(run.failed)
    return str(run.root)


def export_distributed() -> None:
    """In a job of several tasks (one per GPU): RANK, WORLD_SIZE, MASTER_ADDR, ... from
    SLURM's task layout, as torchrun would set them (every task sees all the node's GPUs
    and picks its own by LOCAL_RANK)."""
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    try:
        tasks = JobEnvironment().num_tasks
    except RuntimeError:
        return   # not inside a submitit job (called directly)
    if tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


class Preemption:
    """While a stage job trains: submitit's preemption/timeout signal (USR2) stops the
    stage at its next step boundary with a checkpoint (through the SIGTERM path training
    already has), and only then submitit requeues the job. Before training started the
    signal goes to submitit at once (nothing to save)."""

    def __init__(self):
        self.signum = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        self.submitit_handler = signal.getsignal(self.signum)
        self.idle_term = signal.getsignal(signal.SIGTERM)   # replaced by training's while a stage trains
        self.preempted = False

    def handle(self, signum, frame) -> None:
        self.preempted = True
        if signal.getsignal(signal.SIGTERM) is not self.idle_term:
            os.kill(os.getpid(), signal.SIGTERM)   # training checkpoints at the next step and stops
        else:
            self.requeue(signum, frame)

    def requeue(self, signum=None, frame=None) -> None:
        """submitit's own handler: calls StageJob.checkpoint, requeues the job, exits."""
        if callable(self.submitit_handler):
            self.submitit_handler(signum or self.signum, frame)


def requeue_on_preemption():
    """A context (see Preemption) active only inside a submitit job's main thread."""
    from contextlib import contextmanager
    import threading

    from submitit import JobEnvironment

    @contextmanager
    def active():
        try:
            JobEnvironment()
        except RuntimeError:
            yield None
            return
        if threading.current_thread() is not threading.main_thread():
            yield None
            return
        preemption = Preemption()
        signal.signal(preemption.signum, preemption.handle)
        try:
            yield preemption
        finally:
            signal.signal(preemption.signum, preemption.submitit_handler)
    return active()


# ---------------------------------------------------------------- submitting


@dataclass
class Submitted:
    """What was submitted: (label, job) in submission order, and where their logs go."""

    jobs: list
    log_dir: Path

    def lines(self) -> list[str]:
        return [f"  {label:<28} job {job.job_id}" for label, job in self.jobs]


def submit_run(recipe: Recipe, recipe_file: str, out_dir: Path, base_dir: Path, cache_root: Path,
               cluster: str = "slurm", force: bool = False, log=print) -> Submitted:
    """Check the recipe, claim the run directory, submit its jobs; return without waiting
    (SLURM). With submitit's local/debug executors each job waits for its dependencies."""
    import submitit

    from posttrain.artifacts import RunDir
    from posttrain.checks import check_static

    check_static(recipe, base_dir, recipe_file, world_size=1)   # with resource_problems
    run = RunDir(out_dir)
    run.claim(recipe.name, force=force)
    log_dir = run.area.mkdir(run.root / "slurm")
    # submitit's local executors run every job on this machine, whatever the recipe asks.
    spec = RunSpec(recipe, str(run.root), str(base_dir), str(cache_root),
                   stage_device(recipe) if cluster == "slurm" else None)
    submitted: list = []

    def submit(label, resources, after, function, *args):
        if cluster != "slurm":
            for job in after:
                job.result()   # no dependencies in submitit's local executors: wait for them
        params = executor_parameters(resources, f"{recipe.name}-{label}", cluster,
                                     per_gpu_tasks=label not in ("prepare", "evaluate"))
        if after and cluster == "slurm":
            params["slurm_dependency"] = "afterok:" + ":".join(job.job_id for job in after)
            # A failed upstream job cancels the jobs after it, instead of leaving them pending
            # forever (DependencyNeverSatisfied); submitting again resumes from the cache.
            params["slurm_additional_parameters"] = {"kill-on-invalid-dep": "yes"}
        job = submit_one(submitit, log_dir, cluster, params, function, *args)
        submitted.append((label, job))
        log(f"  submitted {label:<24} job {job.job_id}")
        return job

    prepare = submit("prepare", job_resources(recipe, "prepare"), [], prepare_job, spec)
    stage_jobs = {}
    for node, parent in stage_graph(recipe):
        after = [prepare] + ([stage_jobs[parent]] if parent is not None else [])
        stage_jobs[node] = submit(node.label, job_resources(recipe, "stage", node.stage), after, StageJob(spec, node))
    submit("evaluate", job_resources(recipe, "evaluate"), [prepare, *stage_jobs.values()], evaluate_job, spec)
    return Submitted(submitted, log_dir)


def submit_one(submitit, log_dir: Path, cluster: str, params: dict, function, *args):
    """One job through a fresh executor (submitit keeps parameters across updates, and a
    job without dependencies must not inherit the last one's); SLURM's refusals as user errors."""
    import subprocess

    try:
        executor = submitit.AutoExecutor(folder=log_dir, cluster=cluster)
        executor.update_parameters(**params)
        return executor.submit(function, *args)
    except RuntimeError as exc:   # submitit: no srun here
        raise PosttrainError(f"--executor {cluster}: {exc} (submit from a machine of the cluster, "
                             "e.g. its login node)") from None
    except subprocess.CalledProcessError as exc:   # sbatch refused the job (partition, account, time, ...)
        raise PosttrainError(f"sbatch refused job {params.get('name')}: "
                             f"{(exc.output or b'').decode(errors='replace').strip()}") from None


def run_on_cluster(recipe: Recipe, recipe_file: str, out_dir: Path, cache_dir: str | None, force: bool,
                   log) -> Submitted:
    """`posttrain run --executor slurm`: submit, say what and where, return."""
    from posttrain.cache import Cache

    cache = Cache(cache_dir)
    cache.ensure()   # a --cache that is a folder of the user's is refused before anything is submitted
    log(f"submitting {recipe_file} to SLURM -> {out_dir} (stage cache {cache.root}: every node must see it)")
    submitted = submit_run(recipe, recipe_file, out_dir, Path(recipe_file).resolve().parent, cache.root,
                           cluster="slurm", force=force, log=log)
    log(f"logs: {submitted.log_dir}/<job id>_0_log.out (and .err); the report will be in {out_dir}. "
        "Submitting the same command again reuses finished stages and resumes unfinished ones.")
    return submitted


__all__ = ["EXECUTORS", "StageJobSpec", "job_resources", "stage_graph", "submit_run"]
