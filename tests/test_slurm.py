"""`posttrain run --executor slurm`: the real submitit SLURM executor against stand-in
sbatch/squeue/sacct/scancel scripts on PATH (as submitit's own tests stand in for SLURM),
and submitit's local executors end to end against `--executor local`."""

import os
import re
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from posttrain.cli import main
from posttrain.executors import job_resources, stage_graph
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
    assert "--dependency" not in flags["prepare"]
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


def test_submission_refuses_a_batch_its_gpus_cannot_share(tmp_path, fake_slurm):
    recipe = tiny_with(tmp_path, "", sft="{gpus: 3}")
    result = CliRunner().invoke(main, ["run", str(recipe), "--executor", "slurm", "--out", str(tmp_path / "run"),
                                       "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 2
    assert re.search(r"tiny.yaml:\d+: stages.sft.resources: stage sft runs on 3 processes", result.output)
    assert not (fake_slurm / "next").exists()   # nothing submitted


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
