"""Stage size estimates: steps as transformers counts them, tokens as stages count them;
the tokens a stage records are those it trained, after max_length cut them."""

import json

import pytest
import yaml
from click.testing import CliRunner

from posttrain.cli import main
from posttrain.data.formats import to_kind
from posttrain.estimate import (EpochSize, Measured, Tokenization, conversations, epoch_size, estimate_stage,
                                match_steps, measure, measured_rows, steps_per_epoch, tokenization)
from posttrain.models import ModelSource, chat_tokenizer
from posttrain.records import Cost
from posttrain.stages import METHODS, run_stage
from posttrain.stages.common import StageContext
from posttrain.stages.orpo import ORPOStage
from posttrain.stages.sft import SFTStage

MICRO = ModelSource(name="builtin:micro-llama")


def test_steps_per_epoch_counts_partial_batches_and_accumulation():
    assert steps_per_epoch(100, 16, 1) == 7      # 6 full batches + 1 partial
    assert steps_per_epoch(100, 16, 4) == 2      # 7 batches -> 2 optimizer steps
    assert steps_per_epoch(3, 16, 8) == 1


def pair(first, chosen, rejected, bos=False, eos=(True, True)):
    return Measured(first=first, lengths=(chosen, rejected), bos=bos, eos=eos)


def test_an_epoch_counts_kept_rows_cut_at_max_length():
    measured = [pair(2, 5, 7), pair(3, 12, 4), pair(10, 30, 30), pair(9, 10, 11)]
    epoch = epoch_size(measured, rows=4, max_length=10)
    assert epoch == EpochSize(rows=4, dropped=1, truncated=2, tokens=(5 + 7) + (10 + 4) + (10 + 10))
    assert epoch.kept == 3


def test_a_trainer_that_adds_bos_and_eos_counts_them_where_they_are_missing():
    orpo = Tokenization(bos=True, eos=True)
    assert pair(4, 10, 20, eos=(False, True)).under(orpo) == (5, (12, 21))
    assert pair(4, 10, 20, bos=True).under(orpo) == (4, (10, 20))
    assert pair(4, 10, 20, eos=(False, False)).under(Tokenization()) == (4, (10, 20))
    # The BOS moves the first trained token to max_length: the row is dropped.
    assert epoch_size([pair(9, 10, 20)], 1, 10, orpo) == EpochSize(rows=1, dropped=1, truncated=0, tokens=0)


def test_large_periodic_data_is_sampled_at_random_not_every_kth_row():
    # Lengths cycle with period 4: every 4th row is long. A stride sample would see
    # only one phase (all short or all long); a random sample sees the mix.
    lengths = [100 if i % 4 == 3 else 1 for i in range(12_000)]
    measured = [Measured(first=0, lengths=(lengths[i],), bos=False, eos=(True,)) for i in measured_rows(len(lengths))]
    assert len(measured) < len(lengths)
    assert abs(epoch_size(measured, len(lengths), 1000).tokens / sum(lengths) - 1) < 0.05


def test_steps_count_the_rows_kept_and_matching_steps_the_tokens_per_step():
    spec = ORPOStage(method="orpo", data="p", learning_rate=1e-3, batch_size=2, epochs=2)
    estimate = estimate_stage(spec, EpochSize(rows=12, dropped=2, truncated=3, tokens=80))
    assert (estimate.examples, estimate.dropped, estimate.truncated) == (12, 2, 3)
    assert (estimate.steps_per_epoch, estimate.steps, estimate.tokens) == (5, 10, 160)   # 10 rows kept
    # 16 tokens per step: 400 tokens take 25 steps.
    assert match_steps(400, estimate) == 25
    sft = estimate_stage(SFTStage(method="sft", data="d", learning_rate=1e-3, max_steps=3, batch_size=4),
                         EpochSize(rows=8, dropped=0, truncated=0, tokens=24))
    assert (sft.steps, sft.tokens) == (3, round(24 * 3 / 2))


# ---------------------------------------------------------------- known answers where max_length bites

MAX_LENGTH = 64
# (user chars, chosen chars, rejected chars). The builtin tokenizer has one token per
# character: the prompt with its generation prompt is n + 19 tokens, a whole conversation
# n + 21 + m ('<|im_start|>user\n' n '<|im_end|>\n<|im_start|>assistant\n' m '<|im_end|>\n').
PAIRS = [(5, 10, 12),     # short: nothing cut
         (5, 100, 8),     # chosen cut
         (50, 10, 10),    # the prompt (69) fills max_length: dropped
         (10, 33, 5),     # chosen exactly 64: whole (ORPO/CPO add an EOS: 65, cut)
         (10, 32, 5),     # chosen 63 (ORPO/CPO: exactly 64, whole)
         (44, 20, 3),     # prompt 63: kept, one reply token left; both sequences cut
         (45, 5, 5)]      # prompt exactly 64: dropped


def text(role, n):
    return [{"role": role, "content": "a" * n}]


def method_rows(method):
    pairs = [{"prompt": text("user", n), "chosen": text("assistant", c), "rejected": text("assistant", r)}
             for n, c, r in PAIRS]
    kind = METHODS[method].data
    if kind == "instruction":
        return [{"messages": p["prompt"] + p["chosen"]} for p in pairs]
    return pairs if kind == "preference" else to_kind(pairs, "preference", kind)


def known_answer(method):
    """(rows kept, rows cut, tokens) by hand: each sequence n + 21 + m (+1: the EOS ORPO and
    CPO append after a reply that ends in '\\n'), capped at max_length; rows whose prompt
    (n + 19) fills max_length dropped."""
    eos = 1 if METHODS[method].reply_eos else 0
    kind = METHODS[method].data
    rows = [(n, (c, r)) if kind == "preference" else (n, (c,)) for n, c, r in PAIRS]
    if kind == "unpaired":
        rows = [(n, (m,)) for n, c, r in PAIRS for m in (c, r)]
    kept = [(n, replies) for n, replies in rows if n + 19 < MAX_LENGTH]
    lengths = [[n + 21 + m + eos for m in replies] for n, replies in kept]
    return (len(kept), sum(any(n > MAX_LENGTH for n in row) for row in lengths),
            sum(min(n, MAX_LENGTH) for row in lengths for n in row))


@pytest.mark.parametrize("method", list(METHODS))
def test_recorded_tokens_are_those_trained_and_the_estimate_matches(tmp_path, method):
    """One full epoch on rows longer than max_length: stage.json's train tokens are each
    sequence cut as TRL cuts it, over the rows it kept, and the rows cut are counted (a
    sequence exactly max_length long is whole); the plan's estimate says the same."""
    rows = method_rows(method)
    spec = METHODS[method].settings(method=method, data="d", learning_rate=1e-3, max_steps=1,
                                    batch_size=len(rows), max_length=MAX_LENGTH)
    tokenizer = chat_tokenizer(MICRO)
    first = conversations(rows[0])[0]   # the counts below hold for this tokenizer and template
    assert len(tokenizer.apply_chat_template(first, tokenize=True, return_dict=True)["input_ids"]) == 5 + 21 + 10
    (tmp_path / "stage").mkdir()
    cost = run_stage(StageContext(name="stage", spec=spec, seed=0, start=MICRO, examples=rows,
                                  out_dir=tmp_path / "stage")).cost
    kept, cut, tokens = known_answer(method)
    assert (cost["rows_trained"], cost["rows_truncated"], cost["train_tokens"]) == (kept, cut, tokens)
    estimate = estimate_stage(spec, epoch_size(measure(rows, tokenizer), len(rows), MAX_LENGTH,
                                               tokenization(METHODS[method], tokenizer)))
    assert (estimate.examples - estimate.dropped, estimate.truncated, estimate.tokens) == (kept, cut, tokens)


def test_plan_estimates_the_rows_and_tokens_trained(tmp_path, repo):
    """`posttrain plan` on the same rows, from files: rows dropped and cut, steps over the
    rows kept, tokens after truncation (the known answers the stages record, above)."""
    for method in ("sft", "dpo"):
        (tmp_path / f"{method}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in method_rows(method)))
    stage = {"learning_rate": 1e-3, "max_length": MAX_LENGTH, "batch_size": 2}
    recipe = {"name": "cut", "model": {"name": "builtin:micro-llama"},
              "data": {"ins": {"source": "sft.jsonl"}, "prefs": {"source": "dpo.jsonl"}},
              "stages": {"sft": {"method": "sft", "data": "ins", **stage},
                         "dpo": {"method": "dpo", "data": "prefs", **stage},
                         "orpo": {"method": "orpo", "data": "prefs", **stage}},
              "pipelines": {"sft+dpo": ["sft", "dpo"], "orpo": ["orpo"]},
              "eval": {"tasks": [str(repo / "evals" / "skills_mc.yaml")], "limit": 4}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["plan", str(tmp_path / "r.yaml"), "--cache", str(tmp_path / "cache"),
                                       "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["stage"]: row for row in json.loads(result.output[result.output.index("{"):])["stages"]}
    for method in ("sft", "dpo", "orpo"):
        kept, cut, tokens = known_answer(method)
        row = rows[method]
        assert (row["examples"], row["dropped"], row["truncated"], row["tokens_per_epoch"]) == (
            len(PAIRS), len(PAIRS) - kept, cut, tokens), method
        assert row["steps_per_epoch"] == (kept + 1) // 2, method
    text = CliRunner().invoke(main, ["plan", str(tmp_path / "r.yaml"), "--cache", str(tmp_path / "cache")]).output
    assert "cut: rows kept with a sequence longer than max_length" in text


def test_rows_truncated_is_recorded_only_when_known():
    cost = Cost(train_tokens=10, rows_given=4, rows_trained=3, rows_truncated=2)
    assert Cost.from_json(cost.to_json()).rows_truncated == 2
    older = {key: value for key, value in cost.to_json().items() if key != "rows_truncated"}
    assert Cost.from_json(older).rows_truncated is None and "rows_truncated" not in Cost.from_json(older).to_json()


def test_the_report_notes_each_stage_that_cut_rows(tmp_path):
    from posttrain.artifacts import RunDir
    from posttrain.records import StageRecord
    from posttrain.report.build import Run, row_notes

    def record(stage, cut):
        cost = Cost(train_tokens=100, rows_given=10, rows_trained=10, rows_truncated=cut)
        return StageRecord(stage=stage, seed=0, key=stage, chain=[stage], adapter=False, cost=cost, metrics={},
                           method=stage, settings={"max_length": 128}, data={"name": "hh"})

    run = Run(dir=RunDir(tmp_path), rows=[], recipe={}, stages={"dpo": {0: ["d"]}, "orpo": {0: ["o"]}},
              records={"d": record("dpo", 4), "o": record("orpo", 0)})
    assert row_notes([run], {}) == ["Stage dpo cut 4 of the 10 rows it trained at max_length (128 tokens): their "
                                    "tokens past it were not trained, and its train tokens count only those kept."]
