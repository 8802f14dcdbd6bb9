"""The CLI through Click's CliRunner: validate, run end to end (tiny), report."""

import json

from click.testing import CliRunner

from posttrain.cli import main
from tiny_recipes import TINY, write_recipe

FAKE_KEY = "fake0123456789abcdef0123456789abcdef012345"


def test_help_has_examples():
    runner = CliRunner()
    for args in ([], ["run"], ["validate"], ["report"]):
        result = runner.invoke(main, [*args, "--help"])
        assert result.exit_code == 0
        assert "Example" in result.output


def test_validate_ok_and_errors(tmp_path, repo):
    runner = CliRunner()
    good = write_recipe(tmp_path, repo)
    result = runner.invoke(main, ["validate", str(good)])
    assert result.exit_code == 0, result.output
    assert "ok (3 pipelines" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("max_steps: 4", "max_steps: 0").replace("[sft, dpo]", "[sft, dop]"))
    result = runner.invoke(main, ["validate", str(bad), str(good)])
    assert result.exit_code == 2
    assert "bad.yaml:8: stages.sft.max_steps: must be > 0" in result.output
    assert "pipelines.sft+dpo[1]: unknown stage 'dop'" in result.output
    assert "Traceback" not in result.output


def test_run_bad_override_exits_2_without_traceback(tmp_path, repo):
    result = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path, repo)), "-o", "stages.dpo.beta=-1"])
    assert result.exit_code == 2
    assert "stages.dpo.beta: must be > 0" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_run_missing_data_file_is_a_clean_error(tmp_path, repo):
    text = TINY.replace("{source: builtin:skills, limit: 64}", "{source: missing.jsonl}")
    result = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path, repo, text)), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "data file not found" in result.output


def test_run_end_to_end_then_rerun_reuses_and_report_regenerates(tmp_path, repo, monkeypatch):
    runner = CliRunner()
    recipe = write_recipe(tmp_path, repo, TINY + "tracking: {wandb: {mode: offline}}\n")
    out = tmp_path / "run"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    result = runner.invoke(main, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    # SFT is shared by `sft` and `sft+dpo`: three stage runs, not four.
    stage_dirs = sorted(p.name for p in (out / "stages").iterdir())
    assert [d.split("-")[0] for d in stage_dirs] == ["dpo", "orpo", "sft"]
    assert "train  sft" in result.output and result.output.count("train  sft") == 1
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["pipeline"] for r in rows} == {"base", "sft", "sft+dpo", "orpo"}
    assert {(r["task"], r["metric"]) for r in rows} >= {("skills_exact", "exact_match"), ("skills_mc", "acc")}
    for name in ("report.md", "report.json", "report.html", "results.csv", "recipe.resolved.yaml", "env.json",
                 "pipelines.json"):
        assert (out / name).is_file(), name
    table = (out / "report.md").read_text()
    for pipeline in ("| base |", "| sft |", "| sft+dpo |", "| orpo |"):
        assert pipeline in table
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"] == "sft" and report["eval_spec"] == rows[0]["eval_spec"]
    by_name = {p["name"]: p for p in report["pipelines"]}
    assert by_name["sft"]["delta"] == {} and "skills_exact/exact_match" in by_name["orpo"]["delta"]
    assert [s["shared_with"] for s in by_name["sft+dpo"]["stages"]] == [["sft"], []]
    assert len(by_name["orpo"]["stages"]) == 1 and by_name["base"]["stages"] == []
    assert set(by_name["base"]["preferences"]) == {"pref_acc", "margin"}
    assert len(report["samples"]["skills_exact"]) == 3
    assert sorted(p.name for p in (out / "plots").iterdir())[:2] == ["bars_skills_exact_exact_match.png",
                                                                    "bars_skills_mc_acc.png"]
    # One W&B run per trained stage, per evaluation and for the report; no key written anywhere.
    assert len(list((out / "wandb").glob("offline-run-*"))) == 3 + 4 + 1
    leaked = [p for p in out.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not leaked
    info = json.loads((out / "stages" / stage_dirs[0] / "stage.json").read_text())
    assert info["method"] == "dpo" and info["chain"] == ["sft", "dpo"] and info["cost"]["optimizer_steps"] == 2
    # lm-eval's own per-sample records are kept.
    assert list((out / "evals" / "sft" / "seed0").rglob("samples_skills_exact*.jsonl"))

    rerun = runner.invoke(main, ["run", str(recipe), "--out", str(out)])
    assert rerun.exit_code == 0, rerun.output
    # Every stage and every evaluation comes from the cache; only the report is written again.
    assert "  train  " not in rerun.output and "  eval  " not in rerun.output, rerun.output
    assert rerun.output.count("reuse  ") == 3 + 4
    assert rows == [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]

    report_files = ["report.md", "report.json", "report.html", "results.csv",
                    *(f"plots/{p.name}" for p in (out / "plots").iterdir())]
    before = {name: (out / name).read_bytes() for name in report_files}
    for name in report_files:
        (out / name).unlink()
    regenerated = runner.invoke(main, ["report", str(out)])
    assert regenerated.exit_code == 0, regenerated.output
    assert {name: (out / name).read_bytes() for name in report_files} == before

    # Merging runs: the same spec merges (names prefixed), a different spec is refused.
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(out, twin, ignore=shutil.ignore_patterns("wandb"))
    merged = runner.invoke(main, ["report", str(out), str(twin), "--out", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    names = [p["name"] for p in json.loads((tmp_path / "merged" / "report.json").read_text())["pipelines"]]
    assert "run:sft" in names and "twin:sft" in names
    results = twin / "results.jsonl"
    results.write_text(results.read_text().replace(rows[0]["eval_spec"], "0123456789ab"))
    refused = runner.invoke(main, ["report", str(out), str(twin), "--out", str(tmp_path / "merged2")])
    assert refused.exit_code == 2
    assert "different eval specs" in refused.output and "Traceback" not in refused.output


def test_external_model_is_a_row_evaluated_with_the_same_spec(tmp_path, repo):
    from posttrain.models import ModelSource, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ModelSource(name="builtin:micro-llama"))
    model.save_pretrained(tmp_path / "published")
    tokenizer.save_pretrained(tmp_path / "published")
    text = TINY.replace("""pipelines:
  sft: [sft]
  sft+dpo: [sft, dpo]
  orpo: [orpo]""", """pipelines:
  base: []
external:
  published: {published}""").replace("{published}", str(tmp_path / "published"))
    result = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path, repo, text)), "--out", str(tmp_path / "r"),
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    published = {p["name"]: p for p in report["pipelines"]}["published"]
    base = {p["name"]: p for p in report["pipelines"]}["base"]
    # The same weights under the same spec score the same: identical rows.
    assert published["metrics"] == base["metrics"] and published["stages"] == []
