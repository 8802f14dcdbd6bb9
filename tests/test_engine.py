"""The experiment engine: cache reuse, crash and Ctrl-C resume, determinism, plan, cache CLI.

One tiny SFT -> DPO recipe is run uninterrupted twice (separate caches) and once
killed with SIGKILL in the middle of DPO, then re-run. DPO is long enough (240
steps, ~6 s) that the kill lands well inside it: the test kills as soon as the
first DPO checkpoint (every 20 steps) is marked complete.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from posttrain.cli import main
from tiny_recipes import TINY, write_recipe

RECIPE = """
name: resume
model: {name: builtin:micro-llama}
data:
  ins: {source: builtin:skills, limit: 64}
  prefs: {source: builtin:skills-preferences, limit: 64}
stages:
  sft: {method: sft, data: ins, learning_rate: 1.0e-2, max_steps: 5, batch_size: 8, max_length: 96}
  dpo: {method: dpo, data: prefs, learning_rate: 1.0e-3, max_steps: 240, batch_size: 8, max_length: 96,
        logging_steps: 20}
pipelines:
  sft: [sft]
  sft+dpo: [sft, dpo]
eval:
  tasks: [{repo}/evals/skills_exact.yaml]
  limit: 8
  preferences: {source: builtin:skills-preferences, split: test, limit: 16}
  samples: 0
output: {checkpoint_steps: 20}
report: {resamples: 200}
tracking: {wandb: {mode: disabled}}
"""


def results(run_dir):
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    return {(r["pipeline"], r["seed"], r["task"], r["metric"]): r["value"] for r in rows}


def stage_record(run_dir, stage):
    (path,) = (run_dir / "stages").glob(f"{stage}-s0-*")
    return json.loads((path / "stage.json").read_text())


def run_in_process(recipe, out, cache, *extra):
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(out), "--cache", str(cache), *extra])
    assert result.exit_code == 0, result.output
    return result.output


def first_checkpoint(cache):
    """A complete DPO checkpoint in the cache's partial stage dirs, or None."""
    for pending in cache.glob("stages/.partial-*/pending.json"):
        if json.loads(pending.read_text())["stage"] == "dpo":
            marks = list(pending.parent.glob("trainer/checkpoint-*/posttrain_progress.json"))
            if marks:
                return marks[0].parent
    return None


def start_run(recipe, out, cache):
    env = {**os.environ, "POSTTRAIN_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "posttrain", "run", str(recipe), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(process, cache, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        checkpoint = first_checkpoint(cache)
        if checkpoint is not None:
            return checkpoint
        if process.poll() is not None:
            pytest.fail(f"run ended before DPO checkpointed: {process.communicate()[1][-2000:]}")
        time.sleep(0.02)
    process.kill()
    pytest.fail("no DPO checkpoint within the timeout")


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory, repo):
    root = tmp_path_factory.mktemp("engine")
    recipe = root / "resume.yaml"
    recipe.write_text(textwrap.dedent(RECIPE).replace("{repo}", str(repo)))

    clean = root / "clean"
    run_in_process(recipe, clean, root / "cache-clean")
    twin = root / "twin"
    run_in_process(recipe, twin, root / "cache-twin")

    killed_cache = root / "cache-killed"
    process = start_run(recipe, root / "killed", killed_cache)
    checkpoint = wait_for_checkpoint(process, killed_cache)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    resumed_output = run_in_process(recipe, root / "killed", killed_cache)
    return {"root": root, "recipe": recipe, "clean": clean, "twin": twin, "killed": root / "killed",
            "killed_at": checkpoint, "resumed_output": resumed_output, "returncode": process.returncode}


def test_sigkill_mid_dpo_then_rerun_resumes_dpo_and_reuses_sft(engine_runs):
    assert engine_runs["returncode"] == -signal.SIGKILL
    output = engine_runs["resumed_output"]
    assert "reuse  sft (seed 0)" in output and "train  sft" not in output
    step = int(engine_runs["killed_at"].name.split("-")[1])
    assert 0 < step < 240
    resumed_line = next(line for line in output.splitlines() if "resume from step" in line)
    resumed_step = int(resumed_line.split("resume from step ")[1].split()[0])
    assert resumed_step >= step and "dpo" in resumed_line
    assert f"1 to train (resuming dpo (seed 0) from step {resumed_step})" in output
    dpo = stage_record(engine_runs["killed"], "dpo")
    assert dpo["cost"]["resumed_from_step"] == resumed_step and dpo["cost"]["optimizer_steps"] == 240
    # The reference log-probs of the killed attempt were cached and reused on resume.
    assert dpo["cost"]["reference_logps_cached"] is True


def test_resumed_run_ends_with_the_uninterrupted_results(engine_runs):
    """Tolerance: exact for evaluation metrics; 1e-5 for the final DPO training loss (the
    resumed run restores optimizer, scheduler, RNG and data position from the checkpoint)."""
    assert results(engine_runs["killed"]) == results(engine_runs["clean"])
    resumed = stage_record(engine_runs["killed"], "dpo")["metrics"]
    clean = stage_record(engine_runs["clean"], "dpo")["metrics"]
    assert resumed["loss"] == pytest.approx(clean["loss"], abs=1e-5)
    assert resumed["rewards/margins"] == pytest.approx(clean["rewards/margins"], abs=1e-5)


def test_same_recipe_same_seed_identical_metrics(engine_runs):
    assert results(engine_runs["clean"]) == results(engine_runs["twin"])
    assert stage_record(engine_runs["clean"], "dpo")["metrics"] == stage_record(engine_runs["twin"], "dpo")["metrics"]


def test_finished_stage_is_never_half_visible(engine_runs):
    """Only complete stages sit under stages/<key>; the killed attempt lived in .partial-<key>."""
    cache = engine_runs["root"] / "cache-killed"
    finished = [p for p in (cache / "stages").iterdir() if not p.name.startswith(".")]
    assert all((p / "stage.json").is_file() and (p / "model").is_dir() for p in finished)
    assert not list((cache / "stages").glob(".partial-*"))
    # Checkpoints are dropped once a stage is finished.
    assert not list(cache.glob("stages/*/trainer"))


def test_rerun_reuses_everything_and_beta_change_reruns_only_dpo(engine_runs, tmp_path):
    recipe, cache = engine_runs["recipe"], engine_runs["root"] / "cache-clean"
    again = run_in_process(recipe, tmp_path / "again", cache)
    assert "  train  " not in again and "  eval  " not in again
    assert again.count("reuse  ") == 2 + 3  # two stages, three evaluations
    assert results(tmp_path / "again") == results(engine_runs["clean"])

    changed = run_in_process(recipe, tmp_path / "beta", cache, "-o", "stages.dpo.beta=0.3",
                             "-o", "stages.dpo.max_steps=20")
    trained = [line.split()[1] for line in changed.splitlines() if line.startswith("  train  ")]
    evaluated = [line.split("eval")[1].strip() for line in changed.splitlines() if line.startswith("  eval  ")]
    assert trained == ["dpo"] and evaluated == ["sft+dpo (seed 0)"]
    assert "reuse  sft (seed 0)" in changed and "reuse  eval base" in changed
    # The new DPO point reuses the reference log-probs computed for the first one.
    assert stage_record(tmp_path / "beta", "dpo")["cost"]["reference_logps_cached"] is True


def test_plan_shows_what_would_train_and_reuse(engine_runs, tmp_path):
    recipe, cache = engine_runs["recipe"], engine_runs["root"] / "cache-clean"
    result = CliRunner().invoke(main, ["plan", str(recipe), "--cache", str(cache), "--json",
                                       "-o", "stages.dpo.beta=0.5"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output[result.output.index("{"):])
    by_stage = {row["stage"]: row for row in plan["stages"]}
    assert by_stage["sft"]["status"] == "reuse" and by_stage["dpo"]["status"] == "train"
    # The estimate for SFT is exact here (tokens counted as the stage counts them).
    sft_record = stage_record(engine_runs["clean"], "sft")
    assert by_stage["sft"]["key"] == sft_record["key"]
    assert by_stage["sft"]["tokens"] == sft_record["cost"]["train_tokens"]
    assert by_stage["sft"]["steps"] == 5 and by_stage["dpo"]["steps"] == 240
    # The plan says which input of the key changed since the cached stage of that name.
    # (against the most recently used cached dpo: another test of this module may have trained one)
    assert by_stage["sft"]["why"] is None and re.match(r"settings: beta 0\.[13] -> 0\.5", by_stage["dpo"]["why"])
    text = CliRunner().invoke(main, ["run", str(recipe), "--cache", str(cache), "--dry-run"])
    assert text.exit_code == 0 and "2 stage runs: 2 reused from the cache, 0 to train" in text.output


def test_plan_says_a_library_upgrade_retrains_every_stage(engine_runs, monkeypatch):
    import posttrain.plan as plan

    real = plan.library_versions()
    monkeypatch.setattr(plan, "library_versions", lambda: {**real, "trl": "99.0"})
    result = CliRunner().invoke(main, ["plan", str(engine_runs["recipe"]), "--cache",
                                       str(engine_runs["root"] / "cache-clean")])
    assert result.exit_code == 0, result.output
    assert f"why sft (seed 0) trains again: library versions: trl {real['trl']} -> 99.0" in result.output
    assert "why dpo (seed 0) trains again: upstream stage changed" in result.output


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(engine_runs, tmp_path):
    cache = tmp_path / "cache"
    process = start_run(engine_runs["recipe"], tmp_path / "run", cache)
    wait_for_checkpoint(process, cache)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "interrupted: stage dpo (seed 0) stopped at step" in err and "again to resume" in err
    stopped_at = int(err.split("stopped at step ")[1].split("/")[0])
    # The stop saved a checkpoint at that very step, and the plan offers to resume from it.
    assert list(cache.glob(f"stages/.partial-*/trainer/checkpoint-{stopped_at}/posttrain_progress.json"))
    plan = CliRunner().invoke(main, ["plan", str(engine_runs["recipe"]), "--cache", str(cache), "--json"])
    statuses = {row["stage"]: row["status"] for row in json.loads(plan.output[plan.output.index("{"):])["stages"]}
    assert statuses == {"sft": "reuse", "dpo": f"resume@{stopped_at}"}


def test_cache_ls_rm_gc(engine_runs, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(engine_runs["root"] / "cache-twin", cache)
    runner = CliRunner()
    listing = runner.invoke(main, ["cache", "ls", "--cache", str(cache), "--json"])
    entries = json.loads(listing.output)
    kinds = sorted({e["kind"] for e in entries})
    assert kinds == ["datasets", "evals", "reflogps", "stages"]
    assert all(e["size"] > 0 for e in entries)
    stages = {e["label"]: e for e in entries if e["kind"] == "stages"}
    assert set(stages) == {"sft (seed 0)", "sft -> dpo (seed 0)"}
    text = runner.invoke(main, ["cache", "ls", "--cache", str(cache)]).output
    assert "sft -> dpo (seed 0)" in text and "total:" in text

    dpo_key = stages["sft -> dpo (seed 0)"]["key"]
    short = runner.invoke(main, ["cache", "rm", "--cache", str(cache), dpo_key[:3]])
    assert short.exit_code == 2 and "at least 6 characters" in short.output
    removed = runner.invoke(main, ["cache", "rm", "--cache", str(cache), dpo_key[:12]])
    assert removed.exit_code == 0 and "removed 1 entry" in removed.output
    assert not (cache / "stages" / dpo_key).exists()

    # Nothing is old: gc keeps everything, until a size cap forces LRU eviction.
    kept = runner.invoke(main, ["cache", "gc", "--cache", str(cache)])
    assert "freed 0 B in 0 entries" in kept.output
    old = cache / "stages" / stages["sft (seed 0)"]["key"]
    os.utime(old / ".last_used", (time.time() - 90 * 86400,) * 2)
    dry = runner.invoke(main, ["cache", "gc", "--cache", str(cache), "--dry-run"])
    assert "would remove stages" in dry.output and old.exists()
    runner.invoke(main, ["cache", "gc", "--cache", str(cache)])
    assert not old.exists()
    capped = runner.invoke(main, ["cache", "gc", "--cache", str(cache), "--max-size", "1KB"])
    assert capped.exit_code == 0
    left = json.loads(runner.invoke(main, ["cache", "ls", "--cache", str(cache), "--json"]).output)
    assert sum(e["size"] for e in left) <= 1024


def tiny3(tmp_path, repo, extra=""):
    """The shared tiny recipe (sft, sft+dpo, orpo), W&B off, plus `extra` YAML."""
    return write_recipe(tmp_path, repo, TINY + "tracking: {wandb: {mode: disabled}}\n" + extra)


def plan_json(recipe, *args):
    result = CliRunner().invoke(main, ["plan", str(recipe), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


def test_sweep_points_share_the_sft_prefix(tmp_path, repo):
    plan = plan_json(tiny3(tmp_path, repo), "-o", "sweep.stages.dpo.beta=[0.05,0.1,0.3]")
    stages = [(row["stage"], row["after"]) for row in plan["stages"]]
    # One SFT, three DPO points after it, one ORPO: five stage runs for seven pipelines.
    assert stages.count(("sft", "base")) == 1
    assert sorted(s for s, after in stages if after == "sft") == ["dpo[beta=0.05]", "dpo[beta=0.1]", "dpo[beta=0.3]"]
    assert len(plan["stages"]) == 5
    assert sorted(plan["pipelines"]) == ["base/0", "orpo/0", "sft+dpo[beta=0.05]/0", "sft+dpo[beta=0.1]/0",
                                         "sft+dpo[beta=0.3]/0", "sft/0"]


def test_compute_matching_gives_orpo_the_tokens_of_sft_dpo(tmp_path, repo):
    recipe = tiny3(tmp_path, repo, "compare: {match: tokens}\n")
    plan = plan_json(recipe)
    est = {row["stage"]: row for row in plan["stages"]}
    note = plan["compute_match"]["pipelines"]["orpo"]
    target = est["sft"]["tokens"] + est["dpo"]["tokens"]
    assert plan["compute_match"]["reference"] == "sft+dpo" and note["target_tokens"] == target
    per_step = est["orpo"]["tokens_per_epoch"] / est["orpo"]["steps_per_epoch"]
    assert est["orpo"]["steps"] == note["max_steps"] > 2
    assert abs(note["max_steps"] * per_step - target) <= per_step / 2

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    cost = {p["name"]: p["cost"] for p in report["pipelines"]}
    assert cost["orpo"]["optimizer_steps"] == note["max_steps"]
    # Measured tokens agree with the estimate-based match within 5%.
    assert abs(cost["orpo"]["train_tokens"] / cost["sft+dpo"]["train_tokens"] - 1) < 0.05
    assert any("Compute matched" in n and "orpo trains" in n for n in report["notes"])
    assert "Compute matched" in (out / "report.md").read_text()


def test_two_runs_at_once_train_each_stage_once(tmp_path, repo):
    """Stages train under a per-key lock: a second run waits for, then reuses, what the first trains."""
    recipe = tiny3(tmp_path, repo)
    cache = tmp_path / "cache"
    processes = [start_run(recipe, tmp_path / f"run{i}", cache) for i in range(2)]
    logs = []
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]
        logs.append(err)
    trained = [line.split()[1] for log in logs for line in log.splitlines() if line.startswith("  train  ")]
    assert sorted(trained) == ["dpo", "orpo", "sft"]
    # Whatever one run did not train, it reused (after waiting for the other, or from the cache).
    reused = [line.split()[1] for log in logs for line in log.splitlines() if line.startswith("  reuse  ")
              and "eval" not in line]
    assert sorted(reused) == ["dpo", "orpo", "sft"]
    assert results(tmp_path / "run0") == results(tmp_path / "run1")


def test_cache_lists_a_curated_set_with_its_report_as_one_entry(tmp_path):
    from posttrain.cache import Cache, entries, find, remove

    curated = tmp_path / "curated"
    curated.mkdir()
    (curated / "clean-set-0123456789abcdef.jsonl").write_text('{"messages": []}\n' * 10)
    (curated / "clean-set-0123456789abcdef.curation.json").write_text("{}\n")
    (listed,) = entries(Cache(tmp_path))
    assert (listed.kind, listed.key, listed.label) == ("curated", "0123456789abcdef", "curated clean-set")
    assert listed.size == 17 * 10 + 3
    (found,) = find(entries(Cache(tmp_path)), "012345")
    remove(Cache(tmp_path), found)
    assert not list(curated.iterdir())
