"""One recipe, several processes: `posttrain run` under torchrun (gloo on CPU), two "nodes"
through a localhost rendezvous, and `run --gpus N` re-launching itself through accelerate.

Rank 0 alone plans, writes the run directory, W&B and the report, and evaluates; every
rank trains; the stages are the same (keys, optimizer steps) as in one process, and
the losses agree within float noise: the global batch is the same, split over the ranks.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from posttrain.cli import main

RECIPE = """
name: launch
model: {name: builtin:micro-llama}
data:
  ins: {source: builtin:skills, limit: 64}
  prefs: {source: builtin:skills-preferences, limit: 64}
stages:
  sft: {method: sft, data: ins, learning_rate: 1.0e-2, max_steps: 4, batch_size: 8, max_length: 96, logging_steps: 1}
  dpo: {method: dpo, data: prefs, learning_rate: 1.0e-3, max_steps: 3, batch_size: 8, max_length: 96, logging_steps: 1}
pipelines:
  sft: [sft]
  sft+dpo: [sft, dpo]
eval:
  tasks: [{repo}/evals/skills_exact.yaml]
  limit: 8
  samples: 0
report: {resamples: 100}
tracking: {wandb: {mode: offline}}
"""

# Losses of the same stage on 1 and 2 processes: the same examples per optimizer step,
# summed in another order (measured: 1.2e-7 relative at most here).
LOSS_TOLERANCE = 1e-3


def stage_records(run_dir):
    records = {}
    for path in (run_dir / "stages").glob("*/stage.json"):
        record = json.loads(path.read_text())
        records[record["stage"]] = record
    return records


def step_losses(run_dir, stage):
    (log,) = (run_dir / "stages").glob(f"{stage}-s0-*/trainer_log.jsonl")
    return [entry["loss"] for entry in map(json.loads, log.read_text().splitlines()) if "loss" in entry]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", *args]


def env_with(tmp):
    os.makedirs(tmp, exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, repo):
    root = tmp_path_factory.mktemp("launch")
    recipe = root / "launch.yaml"
    recipe.write_text(textwrap.dedent(RECIPE).replace("{repo}", str(repo)))
    single = CliRunner().invoke(main, ["run", str(recipe), "--out", str(root / "single"),
                                       "--cache", str(root / "cache-single"), "--no-wandb"])
    assert single.exit_code == 0, single.output
    ddp = subprocess.run(torchrun("--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "posttrain",
                                  "run", str(recipe), "--out", str(root / "ddp"), "--cache", str(root / "cache-ddp")),
                         env=env_with(root / "tmp"), capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return {"root": root, "recipe": recipe, "single": single.output, "ddp": ddp}


def test_two_processes_train_the_same_stages_as_one(runs):
    one, two = stage_records(runs["root"] / "single"), stage_records(runs["root"] / "ddp")
    assert set(one) == set(two) == {"sft", "dpo"}
    for stage in one:
        assert two[stage]["key"] == one[stage]["key"]   # the global batch is in the key, not the world size
        assert two[stage]["cost"]["optimizer_steps"] == one[stage]["cost"]["optimizer_steps"]
        assert two[stage]["cost"]["examples_seen"] == one[stage]["cost"]["examples_seen"]
        assert two[stage]["resolved"]["world_size"] == 2 and two[stage]["resolved"]["per_device_batch"] == 4
        assert one[stage]["resolved"]["world_size"] == 1 and one[stage]["resolved"]["per_device_batch"] == 8
        assert step_losses(runs["root"] / "ddp", stage) == pytest.approx(
            step_losses(runs["root"] / "single", stage), rel=LOSS_TOLERANCE)
        # transformers leaves the steps since its last log out of its gathered mean: the
        # stage's mean loss is every step's, averaged over both ranks.
        assert two[stage]["metrics"]["train_loss_mean"] == pytest.approx(
            one[stage]["metrics"]["train_loss_mean"], rel=LOSS_TOLERANCE)


def test_rank_zero_alone_writes_evaluates_and_reports(runs):
    root, err = runs["root"], runs["ddp"].stderr
    # One report, printed once; each model evaluated once (not once per rank).
    assert runs["ddp"].stdout.count("— eval spec") == 1
    for label in ("eval   base", "eval   sft (seed 0)", "eval   sft+dpo (seed 0)"):
        assert err.count(label) == 1, label
    assert err.count("posttrain 0.1.0: running") == 1     # the other rank says nothing
    rows = [json.loads(line) for line in (root / "ddp" / "results.jsonl").read_text().splitlines()]
    single = [json.loads(line) for line in (root / "single" / "results.jsonl").read_text().splitlines()]
    assert sorted((r["pipeline"], r["task"], r["metric"]) for r in rows) == \
        sorted((r["pipeline"], r["task"], r["metric"]) for r in single)
    # One set of W&B runs, as one process makes them: one per trained stage (2), one per
    # evaluation (3: base, sft, sft+dpo) and the report's.
    assert len(list((root / "ddp" / "wandb").glob("offline-run-*"))) == 6
    # The cache holds each stage once, nothing half-written; rank 1's scratch is gone.
    cache = root / "cache-ddp" / "stages"
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2
    assert not list(cache.glob(".partial-*"))
    assert list((root / "tmp").glob("posttrain-rank*")) == []


@pytest.mark.parametrize("case", ["folder of the user's", "bad recipe value"])
def test_a_user_error_stops_every_rank_and_is_said_once(runs, tmp_path, case):
    """Rank 0's own failure (its run directory) and the recipe checks every rank runs: one
    message, from rank 0; the other rank stops without a traceback or a second copy."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a run")
    extra = ["--out", str(folder)] if case == "folder of the user's" else ["-o", "stages.dpo.beta=-1"]
    message = "is not empty and is not a posttrain run directory" if extra[0] == "--out" else "stages.dpo.beta"
    result = subprocess.run(torchrun("--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "posttrain",
                                     "run", str(runs["recipe"]), *extra),
                            env=env_with(tmp_path / "tmp"), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count(message) == 1, result.stderr[-3000:]
    assert "[rank1]: Traceback" not in result.stderr and "[rank0]: Traceback" not in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


SFT_ONLY = RECIPE.replace("name: launch", "name: launch-sft").replace(
    "  sft+dpo: [sft, dpo]\n", "").replace("mode: offline", "mode: disabled")


def test_two_nodes_through_a_localhost_rendezvous(runs, repo, tmp_path):
    """Two torchrun agents of one process each (node ranks 0 and 1), meeting at a
    localhost address as two machines would; run directory and cache shared, as on a
    cluster's filesystem."""
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(textwrap.dedent(SFT_ONLY).replace("{repo}", str(repo)))
    port = str(free_port())
    nodes = [subprocess.Popen(torchrun("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                                       "--master_addr", "127.0.0.1", "--master_port", port, "-m", "posttrain",
                                       "run", str(recipe), "--out", str(tmp_path / "run"),
                                       "--cache", str(tmp_path / "cache")),
                              env=env_with(tmp_path / f"tmp{rank}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "— eval spec" in outputs[0][0] and outputs[1][0].strip() == ""
    sft = stage_records(tmp_path / "run")["sft"]
    alone = stage_records(runs["root"] / "single")["sft"]
    assert sft["key"] == alone["key"] and sft["resolved"]["world_size"] == 2
    assert sft["cost"]["optimizer_steps"] == alone["cost"]["optimizer_steps"]
    assert step_losses(tmp_path / "run", "sft") == pytest.approx(step_losses(runs["root"] / "single", "sft"),
                                                                 rel=LOSS_TOLERANCE)


def test_gpus_relaunches_through_accelerate(runs, repo, tmp_path, monkeypatch, capfd):
    """`run --gpus 2` prints and runs `accelerate launch ... -m posttrain run ...`. The CPU
    stands in for two GPUs (accelerate starts two gloo processes); only the count of
    visible GPUs is faked."""
    import posttrain.ranks

    recipe = tmp_path / "sft.yaml"
    recipe.write_text(textwrap.dedent(SFT_ONLY).replace("{repo}", str(repo)))
    monkeypatch.setattr(posttrain.ranks, "visible_gpus", lambda: 2)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    result = CliRunner().invoke(main, ["run", str(recipe), "--gpus", "2", "--out", str(tmp_path / "run"),
                                       "--cache", str(tmp_path / "cache"), "-o", "stages.sft.max_steps=2"])
    child = capfd.readouterr()
    assert result.exit_code == 0, result.output + child.err[-3000:]
    assert "launching: " in result.output
    assert "-m accelerate.commands.launch --config_file " in result.output and "--num_processes 2" in result.output
    assert "distributed_type=MULTI_GPU" in result.output and "mixed_precision=no" in result.output
    assert "-m posttrain run " + str(recipe) in result.output and "--gpus" not in result.output.split("launching:")[1]
    assert "— eval spec" in child.out
    sft = stage_records(tmp_path / "run")["sft"]
    assert sft["resolved"]["world_size"] == 2 and sft["cost"]["optimizer_steps"] == 2


def test_gpus_refused_without_them(tmp_path, repo):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(textwrap.dedent(SFT_ONLY).replace("{repo}", str(repo)))
    result = CliRunner().invoke(main, ["run", str(recipe), "--gpus", "2", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "--gpus 2: this machine has 0 CUDA GPU(s) visible" in result.output
    assert "torchrun --nproc_per_node N -m posttrain run" in result.output
    assert not (tmp_path / "run").exists()
    odd = CliRunner().invoke(main, ["run", str(recipe), "--gpus", "3"])
    assert odd.exit_code == 2 and "is not divisible by 3" in odd.output
    one = CliRunner().invoke(main, ["run", str(recipe), "--gpus", "1", "--out", str(tmp_path / "run")])
    assert one.exit_code == 2 and "--gpus 1: this machine has no CUDA GPU visible" in one.output
    assert not (tmp_path / "run").exists()


def test_a_world_size_without_a_launcher_is_refused(tmp_path, repo, monkeypatch):
    """WORLD_SIZE left in the environment, no launcher: a message, not accelerate's ValueError."""
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(textwrap.dedent(SFT_ONLY).replace("{repo}", str(repo)))
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "WORLD_SIZE=2 but MASTER_ADDR, MASTER_PORT, RANK unset" in result.output
    assert not (tmp_path / "run").exists()


def test_dry_run_with_gpus_plans_for_them(tmp_path, repo):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(textwrap.dedent(SFT_ONLY).replace("{repo}", str(repo)))
    result = CliRunner().invoke(main, ["run", str(recipe), "--gpus", "4", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    planned = json.loads(result.output[result.output.index("{"):])
    (row,) = planned["stages"]
    assert (row["world_size"], row["per_device_batch"], row["gradient_accumulation"]) == (4, 2, 1)


def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step_and_the_rerun_resumes(repo, tmp_path):
    """Ctrl-C reaches every process of the launcher's group: the ranks agree on the step
    (one collective per step), rank 0 saves the checkpoint and says so once; the same
    command resumes from it."""
    import signal
    import time

    recipe = tmp_path / "sft.yaml"
    recipe.write_text(textwrap.dedent(SFT_ONLY).replace("{repo}", str(repo)).replace("max_steps: 4", "max_steps: 400"))
    def command():
        return torchrun("--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "posttrain", "run",
                        str(recipe), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"))

    first = subprocess.Popen(command(), env=env_with(tmp_path / "tmp"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "cache").glob("stages/.partial-*/pending.json")) and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.05)
    time.sleep(3.0)   # the stage is set up and training on both ranks
    os.killpg(first.pid, signal.SIGINT)   # what a terminal's Ctrl-C does: the whole group
    _, err = first.communicate(timeout=300)
    assert first.returncode != 0
    assert err.count("stopped at step") == 1, err[-3000:]
    step = int(err.split("stopped at step ")[1].split("/")[0])
    assert 0 < step < 400
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err
    again = subprocess.run(command(), env=env_with(tmp_path / "tmp"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming sft (seed 0) from step {step}" in again.stderr
    sft = stage_records(tmp_path / "run")["sft"]
    assert sft["cost"]["optimizer_steps"] == 400 and sft["cost"]["resumed_from_step"] == step
