"""W&B tracking, offline: mode resolution, one run per stage/eval/report, no secrets on disk.

Offline runs keep everything in `run-<id>.wandb` (files/ stays empty until `wandb sync`),
a LevelDB-style log of `wandb.proto.wandb_internal_pb2.Record` messages; wandb 0.31
ships no Python reader for it, so `read_run` below decodes it.
"""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.tracking import Tracker, TrackingError, WandbSettings, has_credentials, resolve_mode

FAKE_KEY = "fake-key-0123456789abcdef0123456789abcdef01234567"
REPORT_HEADER = ["pipeline", "seeds", "skills_exact exact_match"]
REPORT_ROWS = [["base", "1", "0.0"], ["sft", "1", "76.0"]]
EVAL_ROWS = [{"task": "skills_exact", "metric": "exact_match", "value": 0.76, "stderr": 0.03},
             {"task": "skills_mc", "metric": "acc", "value": 0.79, "stderr": None}]


# ---------------------------------------------------------------- mode resolution


def test_auto_is_online_with_a_key_offline_without(tmp_path):
    clean = {"HOME": str(tmp_path)}  # no .netrc, no wandb settings file there
    assert resolve_mode("auto", clean) == "offline"
    assert resolve_mode("auto", {**clean, "WANDB_API_KEY": FAKE_KEY}) == "online"


def test_auto_finds_a_wandb_login_in_netrc(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    assert resolve_mode("auto", {"HOME": str(tmp_path), "NETRC": str(netrc)}) == "online"
    other = tmp_path / "other-netrc"
    other.write_text("machine example.com\n  login user\n  password secret\n")
    other.chmod(0o600)
    assert not has_credentials({"HOME": str(tmp_path), "NETRC": str(other)})


def test_explicit_wandb_mode_env_wins_over_auto(tmp_path):
    env = {"HOME": str(tmp_path), "WANDB_API_KEY": FAKE_KEY}
    assert resolve_mode("auto", {**env, "WANDB_MODE": "offline"}) == "offline"
    assert resolve_mode("auto", {**env, "WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_mode("auto", {"HOME": str(tmp_path), "WANDB_MODE": "dryrun"}) == "offline"
    with pytest.raises(TrackingError, match="WANDB_MODE"):
        resolve_mode("auto", {"WANDB_MODE": "sometimes"})


def test_explicit_modes_are_kept(tmp_path):
    env = {"HOME": str(tmp_path), "WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "online"}
    assert resolve_mode("disabled", env) == "disabled"   # --no-wandb
    assert resolve_mode("offline", env) == "offline"
    assert resolve_mode("online", {"HOME": str(tmp_path)}) == "online"
    with pytest.raises(TrackingError, match="mode"):
        resolve_mode("sometimes", env)


def test_online_without_a_key_fails_before_any_run(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_CONFIG_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(TrackingError, match="API key"):
        Tracker(WandbSettings(mode="online"), tmp_path / "run", "g")


def test_disabled_tracker_imports_neither_wandb_nor_torch(tmp_path):
    code = f"""
import sys
from pathlib import Path
from posttrain.tracking import Tracker, WandbSettings
for tracker in (Tracker(None, Path({str(tmp_path)!r}), "g"), Tracker(WandbSettings(mode="disabled"), Path({str(tmp_path)!r}), "g")):
    assert not tracker.enabled
    with tracker.stage("sft", "sft", 0, {{"learning_rate": 0.1}}) as report_to:
        assert report_to == []
    tracker.log_eval("sft", 0, [{{"task": "t", "metric": "m", "value": 1.0}}])
    tracker.log_report(["a"], [["1"]], None)
heavy = [m for m in ("wandb", "torch", "transformers") if m in sys.modules]
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    assert not (tmp_path / "wandb").exists()


# ---------------------------------------------------------------- offline runs


def wandb_records(path: Path):
    """The protobuf records of a .wandb file: a 7-byte header (":W&B", magic, version), then
    LevelDB log records (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)
    in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, header = 32768, 7
    pos, pending = 7, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if kind == 0:  # zero-filled rest of a block
            pos += left
            continue
        chunk = data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _merge(target: dict, items) -> dict:
    """Apply config/summary/history items; `nested_key` ["report", "path"] sets target["report"]["path"]."""
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = target
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return target


def read_run(path: Path) -> dict:
    """run record, merged config and summary, history rows, artifacts, exit code of one offline run."""
    run = {"config": {}, "summary": {}, "history": [], "artifacts": [], "exit_code": None}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["run"] = record.run
            _merge(run["config"], record.run.config.update)
        elif kind == "config":
            _merge(run["config"], record.config.update)
        elif kind == "summary":
            _merge(run["summary"], record.summary.update)
        elif kind == "history":
            run["history"].append(_merge({}, record.history.item))
        elif kind == "artifact":
            run["artifacts"].append(record.artifact)
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def offline_runs(run_dir: Path, wait_s: float = 30.0) -> dict[str, dict]:
    """{job_type: run} for every offline run under run_dir/wandb (one run per job type here).

    wandb's service writes an offline run's file asynchronously; on a loaded machine (the
    suite's two workers, CI) a file was once read before its run record was in it. Each
    file is read again until it holds its run and exit records, for `wait_s` at most; the
    assertions on what it holds are unchanged."""
    import time

    def complete(path: Path) -> bool:
        try:
            run = read_run(path)
        except Exception:   # a record being written: torn
            return False
        return "run" in run and run["exit_code"] is not None

    paths = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + wait_s
    while not all(map(complete, paths)) and time.monotonic() < deadline:
        time.sleep(0.2)
    runs = [read_run(p) for p in paths]
    by_job = {run["run"].job_type: run for run in runs}
    assert len(by_job) == len(runs), [r["run"].job_type for r in runs]
    return by_job


def sft_context(out_dir: Path):
    from posttrain.stages.sft import SFTStage
    from posttrain.data.builtin import instruction_rows
    from posttrain.models import ModelSource
    from posttrain.stages.common import StageContext

    spec = SFTStage(method="sft", data="d", learning_rate=1e-2, max_steps=3, batch_size=8, max_length=96,
                    logging_steps=1)
    out_dir.mkdir(parents=True)
    return StageContext(name="sft", spec=spec, seed=0, start=ModelSource(name="builtin:micro-llama"),
                        examples=instruction_rows("train", 32), out_dir=out_dir)


def isolate_wandb_home(mp: pytest.MonkeyPatch, home: Path) -> None:
    """wandb's service logs, artifact staging and settings go to ~/.cache, ~/.local, ~/.config."""
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        mp.setenv(var, str(home / sub))


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A tracked experiment: a real 3-step SFT stage, an evaluation, a report; API key in the env."""
    import posttrain.stages.sft as sft

    root = tmp_path_factory.mktemp("tracking")
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_API_KEY", FAKE_KEY)
        isolate_wandb_home(mp, root / "wandb-home")
        mp.chdir(root)  # nothing may land in the cwd
        tracker = Tracker(WandbSettings(mode="offline", tags=("test",)), run_dir, group="quick+start")
        assert tracker.enabled and tracker.mode == "offline"
        ctx = sft_context(run_dir / "stages" / "sft-s0")
        with tracker.stage("sft", "sft", 0, ctx.spec.model_dump(mode="json")) as report_to:
            assert report_to == ["wandb"]
            # The trainer must be built inside the block with this report_to (the pipeline
            # passes it through StageContext into trainer_kwargs); patched here so this test
            # does not depend on that wiring.
            from posttrain.stages import common

            build_kwargs = common.trainer_kwargs
            mp.setattr(common, "trainer_kwargs", lambda c: {**build_kwargs(c), "report_to": report_to})
            trainer, _ = sft.build_trainer(ctx)
            trainer.train()
        tracker.log_eval("sft", 0, EVAL_ROWS)
        html = run_dir / "report.html"
        html.write_text("<html><body><table><tr><td>sft</td></tr></table></body></html>")
        tracker.log_report(REPORT_HEADER, REPORT_ROWS, html)
        assert sorted(p.name for p in root.iterdir()) == ["run", "wandb-home"]
    return run_dir, trainer


def test_one_run_per_stage_eval_and_report_in_one_group(tracked_run):
    run_dir, _ = tracked_run
    runs = offline_runs(run_dir)
    assert set(runs) == {"sft", "eval", "report"}
    assert {run["run"].run_group for run in runs.values()} == {"quick+start"}
    assert {run["run"].project for run in runs.values()} == {"posttrain"}
    assert runs["sft"]["run"].display_name == "sft-s0"
    assert runs["eval"]["run"].display_name == "eval-sft-s0"
    assert list(runs["sft"]["run"].tags) == ["test"]
    assert all(run["exit_code"] == 0 for run in runs.values())


def test_stage_run_has_settings_and_the_trainers_curves(tracked_run):
    run_dir, trainer = tracked_run
    stage = offline_runs(run_dir)["sft"]
    settings = stage["config"]["posttrain"]
    assert settings["stage"] == "sft" and settings["method"] == "sft" and settings["seed"] == 0
    assert settings["learning_rate"] == 1e-2 and settings["max_steps"] == 3 and settings["max_length"] == 96
    # The trainer's WandbCallback reused this run: its TrainingArguments are in its config ...
    assert stage["config"]["max_steps"] == 3
    # ... and its loss curve in its history, one row per logged step.
    losses = [row["train/loss"] for row in stage["history"] if "train/loss" in row]
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == len(logged) == 3
    assert losses == pytest.approx(logged)
    assert "train_loss" in stage["summary"]


def test_eval_run_has_the_metrics_as_summary(tracked_run):
    run_dir, _ = tracked_run
    summary = offline_runs(run_dir)["eval"]["summary"]
    assert summary["skills_exact/exact_match"] == 0.76
    assert summary["skills_exact/exact_match_stderr"] == 0.03
    assert summary["skills_mc/acc"] == 0.79
    assert "skills_mc/acc_stderr" not in summary


def test_report_run_has_the_table_and_the_html_artifact(tracked_run):
    run_dir, _ = tracked_run
    report = offline_runs(run_dir)["report"]
    table = next(row["report"] for row in report["history"] if "report" in row)
    assert table["_type"] == "table-file" and table["ncols"] == len(REPORT_HEADER)
    table_file = next(run_dir.glob(f"wandb/offline-run-*/files/{table['path']}"))
    content = json.loads(table_file.read_text())
    assert content["columns"] == REPORT_HEADER and content["data"] == REPORT_ROWS
    # wandb stores the table itself as a "run_table" artifact; ours is the "report" one.
    [artifact] = [a for a in report["artifacts"] if a.type == "report"]
    assert artifact.name == "quick-start-report"
    assert [entry.path for entry in artifact.manifest.contents] == ["report.html"]


def test_no_file_under_the_run_dir_holds_the_api_key(tracked_run):
    run_dir, _ = tracked_run
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 10
    leaking = [str(p.relative_to(run_dir)) for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert leaking == []


def test_a_failing_stage_finishes_its_run_as_failed(tmp_path, monkeypatch):
    isolate_wandb_home(monkeypatch, tmp_path / "wandb-home")
    tracker = Tracker(WandbSettings(mode="offline"), tmp_path / "run", group="g")
    with pytest.raises(RuntimeError, match="boom"):
        with tracker.stage("dpo", "dpo", 1, {"beta": 0.1}) as report_to:
            assert report_to == ["wandb"]
            raise RuntimeError("boom")
    [run] = offline_runs(tmp_path / "run").values()
    assert run["run"].job_type == "dpo" and run["run"].display_name == "dpo-s1"
    assert run["exit_code"] == 1
    import wandb

    assert wandb.run is None  # finished: the next stage starts a fresh run
