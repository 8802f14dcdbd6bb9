"""Size of a stage before it runs: examples, optimizer steps, train tokens; compute matching.

Tokens are counted the way a finished stage reports them (stages/common.finish):
the sequences TRL builds from the chat template, before truncation: an SFT
example is its whole conversation; a preference pair is prompt+chosen plus
prompt+rejected (DPO and ORPO alike). Datasets over SAMPLE_ROWS rows are estimated
from a seeded random sample of rows, scaled to the whole.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

SAMPLE_ROWS = 2000


@dataclass(frozen=True)
class StageEstimate:
    examples: int
    steps_per_epoch: int
    steps: int
    tokens_per_epoch: int
    tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def steps_per_epoch(examples: int, batch_size: int, gradient_accumulation: int) -> int:
    """transformers' count: batches per epoch, then optimizer steps (a partial last one counts)."""
    batches = math.ceil(examples / batch_size)
    return max(1, math.ceil(batches / gradient_accumulation))


def total_steps(spec, examples: int) -> int:
    if spec.max_steps:
        return spec.max_steps
    return max(1, math.ceil(spec.epochs * steps_per_epoch(examples, spec.batch_size, spec.gradient_accumulation)))


def example_tokens(example: dict, count) -> int:
    """Tokens of one example's training sequences (see module docstring)."""
    if "messages" in example:
        return count(example["messages"])
    prompt = example["prompt"]
    return count(prompt + example["chosen"]) + count(prompt + example["rejected"])


def tokens_per_epoch(examples: list[dict], count) -> int:
    """Every row's tokens up to SAMPLE_ROWS rows; beyond, a seeded random sample scaled up
    (random, not every k-th row: generated and sorted data often cycle with a period)."""
    if not examples:
        return 0
    if len(examples) <= SAMPLE_ROWS:
        return sum(example_tokens(e, count) for e in examples)
    import random

    picked = sorted(random.Random(0).sample(range(len(examples)), SAMPLE_ROWS))
    sampled = sum(example_tokens(examples[i], count) for i in picked)
    return round(sampled * len(examples) / SAMPLE_ROWS)


def chat_token_counter(tokenizer):
    """messages -> token count under the tokenizer's chat template."""
    def count(messages: list[dict]) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    return count


def estimate_stage(spec, examples: list[dict], count, per_epoch_tokens: int | None = None) -> StageEstimate:
    """A stage's size; `per_epoch_tokens` reuses a count already made for the same rows."""
    per_epoch_steps = steps_per_epoch(len(examples), spec.batch_size, spec.gradient_accumulation)
    steps = total_steps(spec, len(examples))
    if per_epoch_tokens is None:
        per_epoch_tokens = tokens_per_epoch(examples, count)
    return StageEstimate(examples=len(examples), steps_per_epoch=per_epoch_steps, steps=steps,
                         tokens_per_epoch=per_epoch_tokens,
                         tokens=round(per_epoch_tokens * steps / per_epoch_steps))


def match_steps(target_tokens: int, estimate: StageEstimate) -> int:
    """Optimizer steps after which a stage has processed about `target_tokens`."""
    tokens_per_step = estimate.tokens_per_epoch / estimate.steps_per_epoch
    return max(1, round(target_tokens / tokens_per_step))
