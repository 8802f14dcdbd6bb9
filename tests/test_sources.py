"""Recipe datasets: mixes, curation wired to the recipe, its cache, and the data commands."""

import json
import textwrap

import pytest
from click.testing import CliRunner

from posttrain.cli import main
from posttrain.recipe.schema import DataSpec
from posttrain.data.sources import DataEnv, load_data
from posttrain.errors import DataError

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


# --------------------------------------------------------------------------- source rows first


def _pair(i, chosen_score=None, rejected_score=None):
    row = {"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
    if chosen_score is not None:
        row |= {"score_chosen": chosen_score, "score_rejected": rejected_score}
    return row


def _write_pairs(tmp_path, rows, name="pairs.jsonl"):
    (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return name


def _prompts(examples):
    return [(e["messages"] if "messages" in e else e["prompt"])[0]["content"] for e in examples]


def test_score_margin_keeps_the_same_pairs_for_every_stage_kind(tmp_path):
    """Curation runs on the pairs before they are converted: SFT on scored pairs with
    min_score_margin trains on the chosen replies of the pairs that pass (it used to
    ignore the margin: SFT rows have no scores), DPO on those pairs, KTO on both replies
    of each. The repeated pair is one pair for all of them."""
    source = _write_pairs(tmp_path, [_pair(1, 9, 1), _pair(2, 5, 4), _pair(3, 7, 2), _pair(3, 7, 2), _pair(4, 6, 6)])
    spec = DataSpec(source=source, curate={"dedup": "exact", "min_score_margin": 3})
    env = DataEnv(base_dir=tmp_path)
    sft, dpo, kto = (load_data("prefs", spec, want, env) for want in ("instruction", "preference", "unpaired"))
    assert sft.examples == [{"messages": [{"role": "user", "content": f"question {i}"},
                                          {"role": "assistant", "content": f"good {i}"}]} for i in (1, 3)]
    assert _prompts(dpo.examples) == ["question 1", "question 3"]
    assert [(p, e["label"]) for p, e in zip(_prompts(kto.examples), kto.examples)] == [
        ("question 1", True), ("question 1", False), ("question 3", True), ("question 3", False)]
    assert sft.curation == dpo.curation == kto.curation
    assert sft.curation["rows_in"] == 5 and sft.curation["rows_out"] == 2
    assert sft.curation["removed"]["exact duplicate"] == 1 and sft.curation["removed"]["score margin"] == 2


def test_score_margin_on_rows_without_scores_is_refused(tmp_path):
    env = DataEnv(base_dir=tmp_path)
    unscored = DataSpec(source=_write_pairs(tmp_path, [_pair(1), _pair(2)]), curate={"min_score_margin": 1})
    with pytest.raises(DataError, match=r"^data.prefs.curate.min_score_margin: no row of data.prefs is a "
                                        "preference pair with score_chosen and score_rejected"):
        load_data("prefs", unscored, "instruction", env)
    instructions = DataSpec(source="builtin:skills", limit=5, curate={"min_score_margin": 1})
    with pytest.raises(DataError, match="min_score_margin"):
        load_data("prefs", instructions, "instruction", env)


def test_limit_counts_source_rows_for_every_stage_kind(tmp_path):
    """`limit: 2` is the first 2 pairs for SFT, DPO and KTO alike (KTO: their 4 replies),
    from a file and from a builtin source; a mix's cap and size count pairs too, and a
    mix's own limit is honoured (it was ignored)."""
    env = DataEnv(base_dir=tmp_path, datasets={
        "file": DataSpec(source=_write_pairs(tmp_path, [_pair(i) for i in range(5)]), limit=2),
        "builtin": DataSpec(source="builtin:skills-preferences", limit=2)})
    env.datasets |= {"capped": DataSpec(mix=[{"data": "builtin", "cap": 1}, {"data": "file"}]),
                     "mixed": DataSpec(mix=[{"data": "file"}, {"data": "builtin"}], limit=3)}
    for name, pairs in (("file", 2), ("builtin", 2), ("capped", 3), ("mixed", 3)):
        spec = env.datasets[name]
        sft, dpo, kto = (load_data(name, spec, want, env) for want in ("instruction", "preference", "unpaired"))
        assert (len(sft.examples), len(dpo.examples), len(kto.examples)) == (pairs, pairs, 2 * pairs), name
        assert _prompts(sft.examples) == _prompts(dpo.examples) == _prompts(kto.examples)[::2], name
    assert _prompts(load_data("file", env.datasets["file"], "unpaired", env).examples) == [
        "question 0", "question 0", "question 1", "question 1"]
