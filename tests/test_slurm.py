"""`posttrain run --executor slurm`: the real submitit SLURM executor against stand-in
sbatch/squeue/sacct/scancel scripts on PATH (as submitit's own tests stand in for SLURM),
and submitit's local executors end to end against `--executor local`."""

import json
import os
import re
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from posttrain.cli import main
from posttrain.executors import executor_parameters, job_resources, stage_graph
from posttrain.recipe.load import load_recipe
from tiny_recipes import TINY, write_recipe

REPO = Path(__file__).resolve().parent.parent

RESOURCES = """
resources:
  partition: gpu
  account: lab
  time: "2:00:00"
  prepare: {cpus: 4, time: 30}
  evaluate: {gpus: 1, time: 45}
"""

# A stand-in for each SLURM command submitit calls: sbatch keeps the file it was given and
# answers as sbatch does; the others answer as for jobs that are still pending.
STANDINS = {
    "sbatch": """#!/bin/sh
id=$(cat "$SLURM_STANDIN/next" 2>/dev/null || echo 4100)
echo $((id + 1)) > "$SLURM_STANDIN/next"
for last; do :; done
cp "$last" "$SLURM_STANDIN/job-$id.sh"
echo "Submitted batch job $id"
""",
    "srun": "#!/bin/sh\nexit 0\n",   # submitit looks for it to know it is on a cluster
    "squeue": "#!/bin/sh\nexit 0\n",
    "sacct": "#!/bin/sh\necho 'JobID|State|NodeList'\n",
    "scancel": "#!/bin/sh\necho \"$@\" >> \"$SLURM_STANDIN/cancelled\"\n",
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    for name, text in STANDINS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_STANDIN", str(bin_dir))
    return bin_dir


def sbatch_flags(path: Path) -> dict:
    return dict(re.findall(r"^#SBATCH (--[\w-]+)=?(.*)$", path.read_text(), re.M))


def tiny_with(tmp_path, extra: str, **stage_resources) -> Path:
    text = TINY + extra
    for stage, line in stage_resources.items():
        text = text.replace(f"  {stage}: {{method: {stage},", f"  {stage}: {{resources: {line}, method: {stage},")
    return write_recipe(tmp_path, REPO, text)


def test_stage_jobs_submitted_in_dependency_order_with_their_resources(tmp_path, fake_slurm):
    recipe = tiny_with(tmp_path, RESOURCES, dpo="{gpus: 2, time: 90, partition: big}")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(recipe), "--executor", "slurm", "--out", str(out),
                                       "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    ids = {label: job for label, job in re.findall(r"submitted (\S+)\s+job (\d+)", result.output)}
    assert list(ids) == ["prepare", "sft-s0", "sft-dpo-s0", "orpo-s0", "evaluate"]
    assert list(ids.values()) == [str(n) for n in range(4100, 4105)]   # submitted in this order
    flags = {label: sbatch_flags(fake_slurm / f"job-{job}.sh") for label, job in ids.items()}
    assert "--dependency" not in flags["prepare"] and "--kill-on-invalid-dep" not in flags["prepare"]
    assert flags["sft-dpo-s0"]["--kill-on-invalid-dep"] == "yes"   # a failed upstream job cancels it
    assert flags["sft-s0"]["--dependency"] == f"afterok:{ids['prepare']}"
    assert flags["sft-dpo-s0"]["--dependency"] == f"afterok:{ids['prepare']}:{ids['sft-s0']}"
    assert flags["orpo-s0"]["--dependency"] == f"afterok:{ids['prepare']}"
    assert flags["evaluate"]["--dependency"] == "afterok:" + ":".join(
        ids[label] for label in ("prepare", "sft-s0", "sft-dpo-s0", "orpo-s0"))
    # Resources: the recipe's defaults, a stage's own over them, posttrain's where none given.
    assert flags["prepare"]["--time"] == "30" and flags["prepare"]["--cpus-per-task"] == "4"
    assert "--gpus-per-node" not in flags["prepare"]
    assert flags["sft-s0"]["--partition"] == "gpu" and flags["sft-s0"]["--time"] == "120"
    assert flags["sft-s0"]["--gpus-per-node"] == "1" and flags["sft-s0"]["--account"] == "lab"
    assert flags["sft-dpo-s0"]["--partition"] == "big" and flags["sft-dpo-s0"]["--time"] == "90"
    assert flags["sft-dpo-s0"]["--gpus-per-node"] == "2" and flags["sft-dpo-s0"]["--ntasks-per-node"] == "2"
    assert flags["evaluate"]["--time"] == "45"
    # Logs and pickled jobs live under the run directory; nothing ran yet.
    assert f"logs: {out / 'slurm'}" in result.output
    assert (out / "slurm" / f"{ids['sft-s0']}_submitted.pkl").is_file()
    assert flags["sft-s0"]["--output"].startswith(str(out / "slurm"))
    assert not (out / "plan.json").exists()


def test_data_and_evaluation_jobs_are_one_task_whatever_the_training_defaults(tmp_path, fake_slurm):
    """Top-level `gpus`/`nodes` are for training: a data or evaluation job of several tasks
    would prepare or evaluate everything once per task, into the same run directory."""
    recipe = tiny_with(tmp_path, "resources: {gpus: 4, nodes: 2, time: 60}\n")
    result = CliRunner().invoke(main, ["run", str(recipe), "--executor", "slurm", "--out", str(tmp_path / "run"),
                                       "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    ids = dict(re.findall(r"submitted (\S+)\s+job (\d+)", result.output))
    flags = {label: sbatch_flags(fake_slurm / f"job-{job}.sh") for label, job in ids.items()}
    for label in ("prepare", "evaluate"):
        assert flags[label]["--nodes"] == "1" and flags[label]["--ntasks-per-node"] == "1", flags[label]
    assert "--gpus-per-node" not in flags["prepare"] and flags["evaluate"]["--gpus-per-node"] == "1"
    assert flags["sft-s0"]["--ntasks-per-node"] == "4" and flags["sft-s0"]["--nodes"] == "2"


def test_submission_refuses_a_batch_its_gpus_cannot_share(tmp_path, fake_slurm):
    recipe = tiny_with(tmp_path, "", sft="{gpus: 3}")
    result = CliRunner().invoke(main, ["run", str(recipe), "--executor", "slurm", "--out", str(tmp_path / "run"),
                                       "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 2
    assert re.search(r"tiny.yaml:\d+: stages.sft.resources: stage sft runs on 3 processes", result.output)
    assert not (fake_slurm / "next").exists()   # nothing submitted
    checked = CliRunner().invoke(main, ["validate", str(recipe)])   # and `validate` says so
    assert checked.exit_code == 2 and "stages.sft.resources: stage sft runs on 3 processes" in checked.output


def test_resources_are_validated(tmp_path):
    recipe = tiny_with(tmp_path, "resources: {gpus: -1, time: 4h, qos: '', prepare: {nodes: 0}}\n",
                       sft="{mem_gb: 0}")
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2
    for expected in ("resources.gpus: must be >= 0", "resources.time: must be minutes",
                     "resources.qos: must not be empty", "resources.prepare.nodes: must be > 0",
                     "stages.sft.resources.mem_gb: must be > 0"):
        assert expected in result.output


def test_resources_are_in_no_stage_key(tmp_path):
    from posttrain.plan import make_plan

    plain = load_recipe(write_recipe(tmp_path, REPO))
    (tmp_path / "other").mkdir()
    placed = load_recipe(tiny_with(tmp_path / "other", RESOURCES, sft="{gpus: 4, time: '1-00:00:00'}"))
    assert placed.stages["sft"].resources.gpus == 4
    keys = [sorted(make_plan(recipe, tmp_path).nodes) for recipe in (plain, placed)]
    assert keys[0] == keys[1] and len(keys[0]) == 3


def test_stage_graph_is_the_plans_nodes_without_data(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, REPO), ["seeds=[0,1]"])
    graph = stage_graph(recipe)
    assert [(node.label, parent.label if parent else None) for node, parent in graph] == [
        ("sft-s0", None), ("sft-s1", None), ("sft-dpo-s0", "sft-s0"), ("sft-dpo-s1", "sft-s1"),
        ("orpo-s0", None), ("orpo-s1", None)]
    pinned = load_recipe(write_recipe(tmp_path, REPO), ["seeds=[0,1]", "stages.orpo.seed=7"])
    assert [node.label for node, _ in stage_graph(pinned)].count("orpo-s0") == 1
    assert "orpo-s1" not in [node.label for node, _ in stage_graph(pinned)]   # one key: trained once
    assert job_resources(recipe, "prepare") == {"gpus": 0, "time": 60}


# ---------------------------------------------------------------- end to end, on this machine

E2E = (TINY.replace("  orpo: [orpo]\n", "").replace("  orpo: {method: orpo, data: prefs, learning_rate: 1.0e-2, "
                                                   "max_steps: 2, batch_size: 8, max_length: 96}\n", "")
       .replace("max_steps: 2, batch_size: 8", "max_steps: 3, batch_size: 8"))


def results(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    return {(r["pipeline"], r["seed"], r["task"], r["metric"]): r["value"] for r in rows}


def stage_keys(run_dir: Path) -> dict:
    return {row["stage"]: row["key"] for row in json.loads((run_dir / "plan.json").read_text())["stages"]}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """The tiny recipe run in this process (`--executor local`), and through submitit's local
    executor (each job its own process, run in dependency order) with its own cache."""
    from posttrain.executors import submit_run

    root = tmp_path_factory.mktemp("e2e")
    assert "orpo" not in E2E
    recipe_file = write_recipe(root, REPO, E2E)
    recipe = load_recipe(recipe_file, ["tracking.wandb.mode=disabled"])
    clean = CliRunner().invoke(main, ["run", str(recipe_file), "--no-wandb", "--out", str(root / "clean"),
                                      "--cache", str(root / "cache-clean")])
    assert clean.exit_code == 0, clean.output
    lines = []
    submitted = submit_run(recipe, str(recipe_file), root / "jobs", root, root / "cache-jobs", cluster="local",
                           log=lines.append)
    outcome = {label: job.result() for label, job in submitted.jobs}
    return {"root": root, "recipe": recipe, "recipe_file": recipe_file, "outcome": outcome, "lines": lines,
            "submitted": submitted}


def test_local_executor_gives_the_results_of_executor_local(e2e):
    root = e2e["root"]
    assert [label for label, _ in e2e["submitted"].jobs] == ["prepare", "sft-s0", "sft-dpo-s0", "evaluate"]
    assert stage_keys(root / "jobs") == stage_keys(root / "clean")
    assert results(root / "jobs") == results(root / "clean")
    assert (root / "jobs" / "report.md").is_file()
    # Each stage job trained its own node, nothing else (its log says so).
    for label, stage in (("sft-s0", "sft"), ("sft-dpo-s0", "dpo")):
        job = dict(e2e["submitted"].jobs)[label]
        log = Path(job.paths.stdout).read_text()
        assert f"train  {stage} " in log and log.count("  train  ") == 1, log[-2000:]
    assert e2e["outcome"]["sft-dpo-s0"] == stage_keys(root / "clean")["dpo"]


def cache_without_dpo(e2e, tmp_path) -> Path:
    """The clean run's cache less its DPO stage and its evaluations: SFT is there to reuse."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(e2e["root"] / "cache-clean", cache, symlinks=True)
    shutil.rmtree(cache / "stages" / stage_keys(e2e["root"] / "clean")["dpo"])
    shutil.rmtree(cache / "evals")
    return cache


def test_a_stage_job_stopped_mid_training_resumes_when_resubmitted(e2e, tmp_path, monkeypatch):
    """The DPO job is stopped through the SIGTERM path SLURM takes before preempting (the
    signal sent at its first step); submitting again reuses SFT and resumes DPO from its
    checkpoint, to the results of an uninterrupted run. submitit's debug executor runs the
    jobs in this process, so the stand-in signal can be planted here."""
    import signal
    from contextlib import contextmanager

    import posttrain.training as training
    from posttrain.executors import submit_run

    real = training.stop_on_signals
    calls = []

    @contextmanager
    def sigterm_in_second_stage(log):
        with real(log) as requested:
            calls.append(1)
            if len(calls) == 1:   # the one stage to train: dpo
                os.kill(os.getpid(), signal.SIGTERM)
            yield requested

    monkeypatch.setattr(training, "stop_on_signals", sigterm_in_second_stage)
    monkeypatch.setattr("pdb.post_mortem", lambda *args: None)   # the debug executor opens pdb on a failed job
    cache, out, root = cache_without_dpo(e2e, tmp_path), tmp_path / "run", e2e["root"]
    with pytest.raises(Exception) as failed:
        submitted = submit_run(e2e["recipe"], str(e2e["recipe_file"]), out, root, cache, cluster="debug",
                               log=print)
        [job.result() for _, job in submitted.jobs]
    assert "stopped at step" in str(failed.value)
    assert list(cache.glob("stages/.partial-*/trainer/checkpoint-*/posttrain_progress.json"))
    lines = []
    monkeypatch.setattr(training, "stop_on_signals", real)
    again = submit_run(e2e["recipe"], str(e2e["recipe_file"]), out, root, cache, cluster="debug",
                       log=lines.append)
    for _, job in again.jobs:
        job.result()
    records = {path.name.split("-s0-")[0]: json.loads((path / "stage.json").read_text())
               for path in (out / "stages").iterdir()}
    assert records["sft"]["reused"] is True                 # finished before the stop: from the cache
    assert records["dpo"]["cost"]["resumed_from_step"] == 1  # from the checkpoint the stop saved
    assert records["dpo"]["cost"]["optimizer_steps"] == 3
    assert results(out) == results(root / "clean")
    assert stage_keys(out) == stage_keys(root / "clean")
    assert not list(cache.glob("stages/.partial-*"))


def test_dtype_auto_with_stages_on_gpu_and_on_cpu_is_refused(tmp_path, fake_slurm):
    recipe = tiny_with(tmp_path, "", sft="{gpus: 0}")
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", "model.dtype=auto", "--executor", "slurm",
                                       "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 2
    assert "model.dtype: auto resolves to bfloat16 on a GPU and float32 on CPU, and these stages run on CPU " \
           "(resources gpus 0): sft" in result.output


def test_preemption_signal_checkpoints_then_requeues_and_the_requeued_job_resumes(e2e, tmp_path, monkeypatch):
    """submitit signals USR2 before a time limit or preemption; its handler requeues the
    job and exits at once. A stage job first lets the stage save a checkpoint at its step
    boundary and only then hands over to submitit's handler (here a stand-in that records
    the moment); the job submitit requeues (StageJob.checkpoint) resumes from it."""
    import signal
    from contextlib import contextmanager

    import posttrain.training as training
    from posttrain.executors import RunSpec, StageJob, StageJobSpec, submit_run

    class Requeued(Exception):
        pass

    real, seen = training.stop_on_signals, []

    @contextmanager
    def usr2_in_second_stage(log):
        with real(log) as requested:
            seen.append("train")
            if len(seen) == 1:
                os.kill(os.getpid(), signal.SIGUSR2)
            yield requested

    def submitit_stand_in(signum, frame):
        seen.append(sorted(p.name for p in cache.glob("stages/.partial-*/trainer/checkpoint-*")))
        raise Requeued

    monkeypatch.setattr(training, "stop_on_signals", usr2_in_second_stage)
    monkeypatch.setattr("pdb.post_mortem", lambda *args: None)
    cache, out = cache_without_dpo(e2e, tmp_path), tmp_path / "run"
    previous = signal.signal(signal.SIGUSR2, submitit_stand_in)
    try:
        with pytest.raises(Requeued):   # raised from inside the DPO job: the submitter stops there
            submit_run(e2e["recipe"], str(e2e["recipe_file"]), out, e2e["root"], cache, cluster="debug", log=print)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == ["train", ["checkpoint-1"]]   # handed over only once the checkpoint was saved
    monkeypatch.setattr(training, "stop_on_signals", real)
    stopped = StageJob(RunSpec(e2e["recipe"], str(out), str(e2e["root"]), str(cache)), StageJobSpec(("sft", "dpo"), 0))
    key = stopped.checkpoint().result()   # what submitit runs when the requeued job starts
    (folder,) = (out / "stages").glob("dpo-s0-*")
    record = json.loads((folder / "stage.json").read_text())
    assert key == record["key"] == stage_keys(e2e["root"] / "clean")["dpo"]
    assert record["cost"]["resumed_from_step"] == 1 and record["cost"]["optimizer_steps"] == 3


def distributed_env() -> dict:
    from posttrain.executors import export_distributed

    export_distributed()
    return {name: os.environ.get(name) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}


def test_each_task_of_a_multi_gpu_job_gets_the_torch_distributed_environment(tmp_path, monkeypatch):
    """A stage job on N GPUs runs N tasks; each exports what torchrun would set (submitit's
    local executor runs the tasks as SLURM would, as processes of one job)."""
    import submitit

    monkeypatch.setenv("PYTHONPATH", f"{REPO / 'tests'}{os.pathsep}{REPO}")   # the tasks import this module
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="local")
    executor.update_parameters(**executor_parameters({"gpus": 2, "time": 5}, "dist", "local"))
    envs = executor.submit(distributed_env).results()
    assert sorted(env["RANK"] for env in envs) == ["0", "1"]
    assert {env["WORLD_SIZE"] for env in envs} == {"2"} and len({env["MASTER_PORT"] for env in envs}) == 1
    assert all(env["LOCAL_RANK"] == env["RANK"] and env["MASTER_ADDR"] for env in envs)
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed_env()["RANK"] is None   # outside a submitit job nothing is exported


def test_dry_run_lists_the_jobs_a_submission_would_make(tmp_path, fake_slurm):
    """`--executor slurm --dry-run` shows the cluster's jobs (dependencies, gpus x nodes,
    time), not this machine's plan (found by QA), and submits nothing."""
    recipe = tiny_with(tmp_path, RESOURCES, dpo="{gpus: 2, time: 90, partition: big}")
    result = CliRunner().invoke(main, ["run", str(recipe), "--executor", "slurm", "--dry-run",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines()[1:] if line and not line.startswith("each")}
    assert list(rows) == ["prepare", "sft-s0", "sft-dpo-s0", "orpo-s0", "evaluate"]
    assert "prepare, sft-s0" in rows["sft-dpo-s0"] and "2 x 1" in rows["sft-dpo-s0"] and "90 min" in rows["sft-dpo-s0"]
    assert "0 x 1" in rows["prepare"] and "30 min" in rows["prepare"]
    assert not (tmp_path / "run").exists() and not list(fake_slurm.glob("job-*.sh"))
