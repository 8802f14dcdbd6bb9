"""Stage size estimates: steps as transformers counts them, tokens as stages count them."""

from posttrain.stages.orpo import ORPOStage
from posttrain.stages.sft import SFTStage
from posttrain.estimate import estimate_stage, match_steps, steps_per_epoch, tokens_per_epoch


def words(messages):
    """A stand-in token counter: one token per word of every message."""
    return sum(len(m["content"].split()) for m in messages)


def row(n_words):
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "w " * n_words}]}


def test_steps_per_epoch_counts_partial_batches_and_accumulation():
    assert steps_per_epoch(100, 16, 1) == 7      # 6 full batches + 1 partial
    assert steps_per_epoch(100, 16, 4) == 2      # 7 batches -> 2 optimizer steps
    assert steps_per_epoch(3, 16, 8) == 1


def test_small_datasets_are_counted_exactly():
    rows = [row(n) for n in (1, 2, 3)]
    assert tokens_per_epoch(rows, words) == (1 + 1) + (1 + 2) + (1 + 3)


def test_large_periodic_data_is_sampled_at_random_not_every_kth_row():
    # Lengths cycle with period 4: every 4th row is long. A stride sample would see
    # only one phase (all short or all long); a random sample sees the mix.
    rows = [row(100 if i % 4 == 3 else 1) for i in range(12_000)]
    truth = sum(words(r["messages"]) for r in rows)
    assert abs(tokens_per_epoch(rows, words) / truth - 1) < 0.05


def test_preference_pairs_count_prompt_with_each_reply_and_matching_steps():
    pair = {"prompt": [{"role": "user", "content": "a b"}], "chosen": [{"role": "assistant", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "d e f"}]}
    spec = ORPOStage(method="orpo", data="p", learning_rate=1e-3, batch_size=2, epochs=2)
    estimate = estimate_stage(spec, [pair] * 10, words)
    assert estimate.tokens_per_epoch == 10 * ((2 + 1) + (2 + 3))
    assert (estimate.steps_per_epoch, estimate.steps, estimate.tokens) == (5, 10, 160)
    # 16 tokens per step: 400 tokens take 25 steps.
    assert match_steps(400, estimate) == 25
    sft = estimate_stage(SFTStage(method="sft", data="d", learning_rate=1e-3, max_steps=3, batch_size=4),
                         [row(2)] * 8, words)
    assert (sft.steps, sft.tokens) == (3, round(8 * 3 * 3 / 2))


def test_sft_counts_each_conversation_cut_to_max_length_as_trl_truncates_it():
    rows = [row(n) for n in (2, 10, 40)]          # 3, 11 and 41 "tokens"
    spec = SFTStage(method="sft", data="d", learning_rate=1e-3, batch_size=3, epochs=1, max_length=12)
    assert estimate_stage(spec, rows, words).tokens == 3 + 11 + 12
    assert tokens_per_epoch(rows, words) == 3 + 11 + 41        # uncapped without a max_length
