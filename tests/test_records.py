"""Typed records (stage record, cost, result row) and run directories written before them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from posttrain.artifacts import MARKER, RUN_FORMAT, RunDir
from posttrain.cli import main
from posttrain.errors import DataError
from posttrain.records import (COST_COLUMNS, FORMAT, BadRecord, Cost, ResultRow, StageRecord, read_results,
                               write_results)

# ----------------------------------------------------------------------------- a format-1 run directory

SFT_DIR, DPO_DIR = "sft-s0-aaaaaaaaaaaa", "dpo-s0-bbbbbbbbbbbb"
EXACT = {"base": [0, 0, 0, 0, 0, 1], "sft": [1, 1, 0, 1, 0, 1], "sft+dpo": [1, 1, 1, 1, 0, 1]}
PREFER = {"base": [1, 0, 0, 1, 0, 1], "sft": [1, 1, 0, 1, 0, 1], "sft+dpo": [1, 1, 1, 1, 1, 1]}


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def old_stage_json(stage: str, key: str, chain: list[str], cost: dict, with_key_inputs: bool) -> dict:
    """A stage.json as 06b2c6a wrote it into the run directory (no "format")."""
    info = {"stage": stage, "method": stage, "seed": 0, "key": key * 64, "chain": chain,
            "parent_key": None if stage == "sft" else "a" * 64, "start_model": "builtin:micro-llama",
            "adapter": False, "settings": {"method": stage, "learning_rate": 0.01},
            "data": {"name": "ins", "format": "messages", "examples": 6, "fingerprint": "f" * 64},
            "cost": cost, "metrics": {"loss": 1.5}, "cache_dir": f"/cache/stages/{key * 64}", "reused": False}
    if with_key_inputs:  # records from before issue 11 lack key_inputs and skipped_rows
        info["key_inputs"] = {"seed": 0}
        info["data"]["skipped_rows"] = 0
    return info


def write_format1_run(root: Path) -> Path:
    """A finished run directory exactly as posttrain 06b2c6a writes one: no format anywhere."""
    write_json(root / MARKER, {"kind": "run", "recipe": "old"})
    (root / "recipe.resolved.yaml").write_text("name: old\nseeds:\n- 0\neval:\n  samples: 2\n"
                                               "report:\n  baseline: sft\n  resamples: 200\n")
    write_json(root / "pipelines.json", {"base": {"0": []}, "sft": {"0": [SFT_DIR]},
                                         "sft+dpo": {"0": [SFT_DIR, DPO_DIR]}})
    write_json(root / "plan.json", {"cache": "/cache", "compute_match": None, "stages": []})
    write_json(root / "data.json", {"ins:instruction": {"name": "ins", "curation": {
        "rows_in": 1200, "rows_out": 1000, "removed": {"exact duplicate": 200, "empty reply": 0},
        "contaminated_by_task": {}, "steps": ["exact dedup"]}}})
    sft_cost = {"optimizer_steps": 4, "examples_seen": 32, "train_tokens": 1802, "forward_passes": 32,
                "backward_passes": 32, "wall_s": 2.04, "resumed_from_step": None, "peak_memory_mb": 557.3,
                "peak_memory_kind": "peak_rss_during_stage"}
    dpo_cost = {**sft_cost, "optimizer_steps": 2, "train_tokens": 2028, "forward_passes": 160,
                "wall_s": 0.53, "peak_memory_mb": 569.7, "reference_logps_cached": False}
    write_json(root / "stages" / SFT_DIR / "stage.json", old_stage_json("sft", "a", ["sft"], sft_cost, False))
    write_json(root / "stages" / DPO_DIR / "stage.json",
               old_stage_json("dpo", "b", ["sft", "dpo"], dpo_cost, True))
    for folder, loss in ((SFT_DIR, 4.2), (DPO_DIR, 0.69)):
        write_jsonl(root / "stages" / folder / "trainer_log.jsonl",
                    [{"loss": loss, "step": 1}, {"loss": loss / 2, "step": 2}, {"train_loss": loss, "step": 2}])
    rows = []
    for pipeline, exact in EXACT.items():
        seed, folder = (None, "base") if pipeline == "base" else (0, "seed0")
        evals = Path("evals") / pipeline / folder
        replies = ["5", "6", "3", "It has 5 letters.", "", "7"] if pipeline != "base" else ["zz"] * 6
        write_jsonl(root / evals / "samples_skills_exact_2026-11-27T19-19-40.jsonl", [
            {"doc_id": i, "doc": {"prompt": f"question {i}?"}, "target": str(i), "resps": [[reply]],
             "filtered_resps": [reply], "filter": "none", "exact_match": float(score)}
            for i, (score, reply) in enumerate(zip(exact, replies))])
        write_jsonl(root / evals / "preferences.jsonl", [
            {"doc_id": i, "chosen_logp": -1.0, "rejected_logp": -1.0 - 2 * (i + 1) * (s - 0.4),
             "margin": 2 * (i + 1) * (s - 0.4), "pref_acc": float(s)} for i, s in enumerate(PREFER[pipeline])])
        common = {"pipeline": pipeline, "seed": seed, "eval_spec": "8d541a097f49"}
        rows += [{**common, "task": "skills_exact", "metric": "exact_match", "value": sum(exact) / 6,
                  "stderr": 0.2, "samples": str(evals / "samples_skills_exact_2026-11-27T19-19-40.jsonl")},
                 {**common, "task": "skills_exact", "metric": "reply_tokens", "value": 1.5, "stderr": None,
                  "samples": None}]
        rows += [{**common, "task": "preferences", "metric": metric, "value": 0.5, "stderr": None,
                  "samples": str(evals / "preferences.jsonl")} for metric in ("pref_acc", "margin")]
    write_jsonl(root / "results.jsonl", rows)
    return root


# What `posttrain report` at 06b2c6a wrote for that directory (report.md's tables), with
# the throughput columns added since: "n/a" (those records never measured it).
FORMAT1_TABLES = """\
| pipeline | seeds | skills_exact/exact_match | Δ skills_exact/exact_match |
|---|---|---|---|
| base | 1 | 16.7 [0.0, 50.0] | -50.0 [-83.3, -16.7] ✱ |
| sft | 1 | 66.7 [33.3, 100.0] |  |
| sft+dpo | 1 | 83.3 [50.0, 100.0] | +16.7 [+0.0, +50.0] |
| pipeline | stages | train tokens | optimizer steps | forward passes | backward passes | train time (s) | peak memory (MB) | tokens/s (real) | tokens/s (padded) | MFU | world size |
|---|---|---|---|---|---|---|---|---|---|---|---|
| base | — | 0 | 0 | 0 | 0 | 0.0 | 0 | n/a | n/a | n/a | n/a |
| sft | sft (shared with sft+dpo) | 1,802 | 4 | 32 | 32 | 2.0 | 557 | n/a | n/a | n/a | n/a |
| sft+dpo | sft (shared with sft) → dpo | 3,830 | 6 | 192 | 64 | 2.6 | 570 | n/a | n/a | n/a | n/a |
| pipeline | prefers chosen (%) | mean log-prob margin | reply tokens (skills_exact) |
|---|---|---|---|
| base | 50.0 [0.0, 83.3] | 0.87 [-2.67, 3.80] | 1.5 |
| sft | 66.7 [33.3, 100.0] | 1.53 [-1.34, 4.20] | 1.5 |
| sft+dpo | 100.0 [100.0, 100.0] | 4.20 [2.60, 6.00] | 1.5 |
| dataset | rows in | rows out | removed (reason: rows) | contaminated (eval task: rows) |
|---|---|---|---|---|
| ins | 1,200 | 1,000 | exact duplicate: 200 | — |
| prompt | reference | base | sft | sft+dpo |
|---|---|---|---|---|
| question 0? | 0 | zz | 5 | 5 |
| question 1? | 1 | zz | 6 | 6 |
"""


def tables(markdown: str) -> str:
    return "".join(line + "\n" for line in markdown.splitlines() if line.startswith("|"))


def test_a_run_directory_written_before_typed_records_reports_the_same_tables(tmp_path):
    run = write_format1_run(tmp_path / "old")
    assert RunDir(run).format == 1
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert tables((run / "report.md").read_text()) == FORMAT1_TABLES
    report = json.loads((run / "report.json").read_text())
    assert [c["label"] for c in report["curves"]] == ["dpo (seed 0)", "sft (seed 0)"]
    assert (run / "results.csv").read_text().splitlines()[1].startswith("base,1,skills_exact/exact_match,")
    assert json.loads((run / MARKER).read_text()) == {"kind": "run", "recipe": "old"}  # reporting writes no record


def test_a_run_directory_from_a_newer_posttrain_is_refused_by_name(tmp_path):
    run = write_format1_run(tmp_path / "new")
    write_json(run / MARKER, {"kind": "run", "recipe": "old", "format": RUN_FORMAT + 1})
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{run}: written by a newer posttrain (run directory format {RUN_FORMAT + 1}" in result.output


@pytest.mark.parametrize("damage, expected", [
    (lambda info: info["cost"].update(wall_s="fast"), "stage.json: wrong type for 'cost.wall_s'"),
    (lambda info: info.update(format=FORMAT + 1),
     f"stage.json: written by a newer posttrain (record format {FORMAT + 1}"),
    (lambda info: info.pop("chain"), "stage.json: lacks valid chain (a list)"),
    (lambda info: info.update(method=3), "stage.json: wrong type for 'method'"),
])
def test_a_damaged_stage_record_names_its_file(tmp_path, damage, expected):
    run = write_format1_run(tmp_path / "old")
    path = run / "stages" / DPO_DIR / "stage.json"
    info = json.loads(path.read_text())
    damage(info)
    write_json(path, info)
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert str(path.parent.name) in result.output and expected in result.output


def test_a_planted_stage_folder_name_is_refused(tmp_path):
    run = write_format1_run(tmp_path / "old")
    write_json(run / "pipelines.json", {"sft": {"0": ["../../elsewhere"]}})
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 2 and "refusing to use '../../elsewhere'" in result.output


# ----------------------------------------------------------------------------- one reader, one writer


def test_a_format1_stage_record_reads_with_defaults_and_is_rewritten_as_format2(tmp_path):
    old = old_stage_json("sft", "a", ["sft"], {"optimizer_steps": 4, "train_tokens": 10}, with_key_inputs=False)
    del old["method"], old["cache_dir"], old["reused"]
    record = StageRecord.from_json(old, key="a" * 64)
    assert record.method is None and record.key_inputs is None and record.cache_dir is None
    assert record.cost == Cost(optimizer_steps=4, train_tokens=10)
    written = record.to_json()
    assert written["format"] == FORMAT and "key_inputs" not in written and "cache_dir" not in written
    assert StageRecord.from_json(written) == record
    with pytest.raises(BadRecord, match="is the record of stage aaaaaaaaaaaa, not of cccccccccccc"):
        StageRecord.from_json(old, key="c" * 64)
    path = tmp_path / "stage.json"
    path.write_text("[]")
    with pytest.raises(DataError, match="stage.json: expected a JSON dict"):
        StageRecord.read(path)


def test_cost_keeps_a_methods_own_counts_and_lists_its_report_columns_once():
    cost = {"optimizer_steps": 2, "examples_seen": 16, "train_tokens": 2028, "forward_passes": 160,
            "backward_passes": 32, "wall_s": 0.53, "resumed_from_step": None, "peak_memory_mb": 569.7,
            "peak_memory_kind": "peak_rss_during_stage", "reference_logps_cached": False}
    parsed = Cost.from_json(cost)
    assert parsed.extra == {"reference_logps_cached": False} and parsed.to_json() == cost
    assert list(COST_COLUMNS) == ["train_tokens", "optimizer_steps", "forward_passes", "backward_passes",
                                  "wall_s", "peak_memory_mb"]


def test_result_rows_round_trip_byte_for_byte(tmp_path):
    """results.jsonl is the report's one source: the typed writer must not change a byte."""
    rows = [{"eval_spec": "8d541a097f49", "metric": "acc", "pipeline": "base", "samples": "evals/x.jsonl",
             "seed": None, "stderr": 0.125, "task": "skills_mc", "value": 0.125},
            {"eval_spec": "8d541a097f49", "metric": "reply_tokens", "pipeline": "sft", "samples": None, "seed": 1,
             "stderr": None, "task": "skills_exact", "value": 3, "added_later": [1, 2]}]
    before = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    path = tmp_path / "results.jsonl"
    path.write_text(before)
    run = RunDir(tmp_path)
    write_results(run.area, run.results, read_results(path))
    assert path.read_text() == before
    assert read_results(path)[1].extra == {"added_later": [1, 2]}
    with pytest.raises(BadRecord, match="wrong type for 'seed'"):
        ResultRow.from_json({**rows[0], "seed": True})
