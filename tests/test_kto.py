"""KTO: unpaired data read and converted exactly, the trainer sees what we mean, cost counted."""

import json

import pytest
from pydantic import ValidationError

from posttrain.data.formats import convert_row, detect_format, to_kind
from posttrain.data.io import load_examples
from posttrain.models import ModelSource
from posttrain.stages.common import StageContext
from posttrain.stages.kto import KTOStage

MICRO = ModelSource(name="builtin:micro-llama")


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


PAIRS = [{"prompt": [user(f"q{i}")], "chosen": [bot(f"good{i}")], "rejected": [bot(f"bad{i}")]} for i in range(4)]


def test_pairs_unpair_as_trl_does():
    """Each pair: its chosen reply desirable, its rejected reply undesirable, same prompt."""
    rows = to_kind(PAIRS, "preference", "unpaired")
    assert rows[:2] == [{"prompt": [user("q0")], "completion": [bot("good0")], "label": True},
                        {"prompt": [user("q0")], "completion": [bot("bad0")], "label": False}]
    assert len(rows) == 8 and sum(r["label"] for r in rows) == 4


def test_published_unpaired_layouts_read_exactly():
    """TRL's prompt/completion/label (strings or messages) and messages + label (KTO datasets)."""
    trl_strings = {"prompt": "q", "completion": "a", "label": False}
    trl_messages = {"prompt": [user("q")], "completion": [bot("a")], "label": True}
    conversation = {"messages": [{"role": "system", "content": "s"}, user("q"), bot("a")], "label": True}
    for row in (trl_strings, trl_messages, conversation):
        assert detect_format([row]) == "unpaired"
    assert convert_row(trl_strings, "unpaired") == {"prompt": [user("q")], "completion": [bot("a")], "label": False}
    assert convert_row(conversation, "unpaired") == {
        "prompt": [{"role": "system", "content": "s"}, user("q")], "completion": [bot("a")], "label": True}


def test_unpaired_data_feeds_sft_with_desirable_replies_only(tmp_path):
    """SFT on KTO data learns the desirable completions, never the undesirable ones."""
    path = tmp_path / "kto.jsonl"
    rows = [{"messages": [user("q1"), bot("keep")], "label": True},
            {"messages": [user("q2"), bot("drop")], "label": False}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert load_examples(str(path), want="instruction").examples == [{"messages": [user("q1"), bot("keep")]}]
    assert len(load_examples(str(path), want="unpaired").examples) == 2
    with pytest.raises(Exception, match="needs preference data"):
        load_examples(str(path), want="preference")


def test_a_label_must_be_a_boolean():
    with pytest.raises(ValueError, match='"label" must be true'):
        convert_row({"prompt": "q", "completion": "a", "label": "yes"}, "unpaired")


def test_kl_loss_needs_a_batch_of_two():
    with pytest.raises(ValidationError, match="batch_size >= 2"):
        KTOStage(method="kto", data="d", learning_rate=1e-3, batch_size=1)
    KTOStage(method="kto", data="d", learning_rate=1e-3, batch_size=1, loss_type="apo_zero_unpaired")


def test_trainer_sees_prompt_completion_and_label_shuffled_by_seed(tmp_path):
    """Known answer: every tokenized row is a pair's prompt with its own chosen (label
    True) or rejected (label False) reply; rows are shuffled by the seed (no batch holds
    a prompt twice in a row) and each KL completion is the previous row's."""
    from posttrain.stages.kto import build_trainer

    from posttrain.data.builtin import preference_rows

    pairs = preference_rows("train", 16)
    spec = KTOStage(method="kto", data="d", learning_rate=1e-3, max_steps=1, batch_size=4, max_length=128,
                    precompute_ref_log_probs=False)
    ctx = StageContext(name="kto", spec=spec, seed=0, start=MICRO, out_dir=tmp_path,
                       examples=to_kind(pairs, "preference", "unpaired"))
    trainer, tokenizer = build_trainer(ctx)
    data = trainer.train_dataset
    replies = {(p["prompt"][-1]["content"], p[side][0]["content"]): side == "chosen"
               for p in pairs for side in ("chosen", "rejected")}
    seen = []
    for row in data:
        prompt = tokenizer.decode(row["prompt_ids"]).split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
        reply = tokenizer.decode(row["completion_ids"]).split("<|im_end|>")[0]
        assert replies[(prompt, reply)] == row["label"], (prompt, reply)
        seen.append((prompt, reply))
    assert sorted(seen) == sorted(replies)                       # every row once
    assert [label for label in data["label"]] != [True, False] * 16   # shuffled, not in pair order
    completions = data["completion_ids"]
    for start in range(0, len(data), 4):                          # KL: rotated within each batch of 4
        batch = completions[start:start + 4]
        assert data["KL_completion_ids"][start:start + 4] == [batch[-1]] + batch[:-1]


def test_cost_counts_kl_and_reference_forwards(tmp_path):
    from posttrain.stages import run_stage

    from posttrain.data.builtin import preference_rows

    spec = KTOStage(method="kto", data="d", learning_rate=1e-3, max_steps=2, batch_size=4, max_length=128)
    examples = to_kind(preference_rows("train", 4), "preference", "unpaired")   # 8 rows: one epoch = 2 steps
    result = run_stage(StageContext(name="kto", spec=spec, seed=0, start=MICRO, out_dir=tmp_path,
                                    examples=examples))
    assert result.cost["examples_seen"] == 8 and result.cost["backward_passes"] == 8
    # 8 policy forwards + 8 KL forwards + the reference's 2 x 8, precomputed once
    assert result.cost["forward_passes"] == 8 + 8 + 16
    assert {"kl", "rewards/chosen", "rewards/rejected"} <= set(result.metrics)


def test_unpaired_rows_curate(tmp_path):
    """Curation reads an unpaired row's completion as its reply (dedup, length filters)."""
    from posttrain.data.curate import curate
    from posttrain.recipe.schema import CurateSpec

    rows = to_kind(PAIRS + PAIRS[:1], "preference", "unpaired")      # the first pair twice
    kept, report = curate(rows, CurateSpec(dedup="exact", max_reply_tokens=1), count_tokens=lambda t: len(t.split()))
    assert len(kept) == 8 and report.to_dict()["rows_out"] == 8


def test_a_kto_file_runs_through_the_cli(tmp_path, repo):
    """As a user would: a .jsonl in TRL's KTO layout (prompt/completion/label, as
    trl-lib's KTO datasets publish it) feeds an SFT stage (desirable rows only) and a KTO
    stage after it; `plan` counts each stage's rows, `run` trains both and reports."""
    from click.testing import CliRunner

    from posttrain.cli import main
    from posttrain.data.builtin import preference_rows
    from tiny_recipes import write_recipe

    rows = []
    for pair in preference_rows("train", 12):
        prompt = pair["prompt"][0]["content"]
        rows.append({"prompt": prompt, "completion": pair["chosen"][0]["content"], "label": True})
        rows.append({"prompt": prompt, "completion": pair["rejected"][0]["content"], "label": False})
    rows = rows[:23]   # 12 desirable, 11 undesirable
    (tmp_path / "kto.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = write_recipe(tmp_path, repo, """
        name: kto-file
        model: {name: builtin:micro-llama}
        data:
          judged: {source: kto.jsonl}
        stages:
          sft: {method: sft, data: judged, learning_rate: 1.0e-2, max_steps: 2, batch_size: 4, max_length: 96}
          kto: {method: kto, data: judged, learning_rate: 1.0e-3, max_steps: 2, batch_size: 4, max_length: 96}
        pipelines:
          sft+kto: [sft, kto]
        eval:
          tasks: [{repo}/evals/skills_exact.yaml]
          limit: 4
          samples: 0
        report: {resamples: 200}
        """)
    cache, out = tmp_path / "cache", tmp_path / "run"
    plan = CliRunner().invoke(main, ["plan", str(recipe), "--cache", str(cache), "--json"])
    assert plan.exit_code == 0, plan.output
    stages = {row["stage"]: row for row in json.loads(plan.stdout)["stages"]}
    assert (stages["sft"]["examples"], stages["kto"]["examples"]) == (12, 23)
    run = CliRunner().invoke(main, ["run", str(recipe), "--cache", str(cache), "--out", str(out), "--no-wandb"])
    assert run.exit_code == 0, run.output
    data = json.loads((out / "data.json").read_text())
    assert {key: (entry["format"], entry["rows"]) for key, entry in data.items()} == {
        "judged:instruction": ("unpaired", 12), "judged:unpaired": ("unpaired", 23)}
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["pipelines"]] == ["base", "sft+kto"]


def test_data_inspect_reads_unpaired_files(tmp_path):
    """`posttrain data inspect` on a KTO file: its kind and label counts, no traceback."""
    from click.testing import CliRunner

    from posttrain.cli import main

    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt": "q1", "completion": "a1", "label": True}, {"prompt": "q1", "completion": "a1", "label": False},
        {"messages": [user("q3"), bot("a3")], "label": True}]))
    result = CliRunner().invoke(main, ["data", "inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "format      unpaired (detected), unpaired data" in result.output
    assert "labels      2 desirable, 1 undesirable" in result.output
    assert "duplicates  0 exact" in result.output   # one completion judged both ways is two judgements


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_every_accepted_loss_builds_a_trainer_and_a_finite_loss(tmp_path, loss_type):
    import torch

    from posttrain.data.builtin import preference_rows
    from posttrain.stages.kto import build_trainer

    spec = KTOStage(method="kto", data="d", learning_rate=1e-3, max_steps=1, batch_size=4, max_length=128,
                    loss_type=loss_type, precompute_ref_log_probs=False)
    trainer, _ = build_trainer(StageContext(name="kto", spec=spec, seed=0, start=MICRO, out_dir=tmp_path,
                                            examples=to_kind(preference_rows("train", 4), "preference", "unpaired")))
    assert trainer.args.loss_type == loss_type
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))


def test_data_inspect_reads_a_kto_stage_dataset_in_its_kind(tmp_path, repo):
    """A recipe dataset only a KTO stage reads is inspected as the labelled rows KTO trains on."""
    from click.testing import CliRunner

    from posttrain.cli import main
    from tiny_recipes import write_recipe

    recipe = write_recipe(tmp_path, repo, """
        name: kto-inspect
        model: {name: builtin:micro-llama}
        data:
          prefs: {source: builtin:skills-preferences, limit: 10}
        stages:
          kto: {method: kto, data: prefs, learning_rate: 1.0e-3}
        pipelines:
          kto: [kto]
        eval:
          tasks: [{repo}/evals/skills_exact.yaml]
        """)
    result = CliRunner().invoke(main, ["data", "inspect", str(recipe), "--dataset", "prefs"])
    assert result.exit_code == 0, result.output
    assert "unpaired data" in result.output and "labels      10 desirable, 10 undesirable" in result.output
