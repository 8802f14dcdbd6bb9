"""Recipe datasets: mixes, curation wired to the recipe, its cache, and the data commands."""

import json
import textwrap

from click.testing import CliRunner

from posttrain.cli import main
from posttrain.recipe.schema import DataSpec
from posttrain.data.sources import DataEnv, load_data

RECIPE = """
name: cur
model: {name: builtin:micro-llama}
data:
  noisy: {source: builtin:skills-noisy, limit: 400}
  curated:
    source: builtin:skills-noisy
    limit: 400
    curate: {dedup: near, max_reply_tokens: 10, drop_refusals: true, decontaminate: true,
             select: {strategy: random, n: 100}}
  both:
    mix: [{data: noisy, cap: 50}, {data: curated, cap: 30}]
stages:
  sft: {method: sft, data: curated, learning_rate: 1.0e-3}
pipelines: {sft: [sft]}
eval: {tasks: [{repo}/evals/skills_exact.yaml]}
"""


def write(tmp_path, repo):
    path = tmp_path / "cur.yaml"
    path.write_text(textwrap.dedent(RECIPE).replace("{repo}", str(repo)))
    return path


def test_mix_caps_parts_deterministically(tmp_path):
    datasets = {"a": DataSpec(source="builtin:skills", limit=100),
                "b": DataSpec(source="builtin:skills-noisy", limit=100)}
    spec = DataSpec(mix=[{"data": "a", "cap": 10}, {"data": "b", "weight": 1.0}], size=20)
    env = DataEnv(base_dir=tmp_path, datasets=datasets)
    first = load_data("m", spec, "instruction", env)
    again = load_data("m", spec, "instruction", env)
    assert len(first.examples) == 30 and first.fingerprint == again.fingerprint


def test_curation_is_cached_and_changes_the_fingerprint(tmp_path):
    logs = []
    spec = DataSpec(source="builtin:skills-noisy", limit=300, curate={"dedup": "exact", "max_reply_tokens": 10})
    env = DataEnv(base_dir=tmp_path, cache_dir=tmp_path / "cache", log=logs.append)
    curated = load_data("d", spec, "instruction", env)
    assert curated.curation["rows_in"] == 300 and curated.curation["rows_out"] == len(curated.examples) < 300
    reused = load_data("d", spec, "instruction", env)
    assert reused.examples == curated.examples and any("reused" in line for line in logs)
    plain = load_data("d", DataSpec(source="builtin:skills-noisy", limit=300), "instruction", env)
    assert plain.fingerprint != curated.fingerprint


def test_data_curate_and_inspect_commands(tmp_path, repo):
    runner = CliRunner()
    recipe = write(tmp_path, repo)
    out = tmp_path / "curated.jsonl"
    result = runner.invoke(main, ["data", "curate", str(recipe), "--dataset", "curated", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".curation.json").read_text())
    assert report["rows_in"] == 400 and report["rows_out"] == 100 == len(out.read_text().splitlines())
    assert report["removed"]["exact duplicate"] > 0 and report["contaminated_by_task"].get("skills_exact", 0) > 0
    inspected = runner.invoke(main, ["data", "inspect", str(out)])
    assert inspected.exit_code == 0 and "100 read" in inspected.output
    by_recipe = runner.invoke(main, ["data", "inspect", str(recipe), "--dataset", "both"])
    assert by_recipe.exit_code == 0, by_recipe.output
    assert "80 read" in by_recipe.output
    assert by_recipe.output.startswith(f"{recipe}: data.both (mix)")   # not the scratch file it was read from
    unknown = runner.invoke(main, ["data", "curate", str(recipe), "--dataset", "nope", "--out", str(out)])
    assert unknown.exit_code == 2 and "unknown dataset" in unknown.output
