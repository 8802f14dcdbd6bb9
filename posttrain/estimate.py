"""Size of a stage before it runs: examples, optimizer steps, train tokens; compute matching.

Tokens are counted the way a finished stage reports them (stages/common.finish):
the sequences TRL builds from the chat template, before truncation: an SFT
example is its whole conversation; a preference pair is prompt+chosen plus
prompt+rejected (DPO, ORPO, CPO alike); an unpaired example (KTO) is
prompt+completion. Datasets over SAMPLE_ROWS rows are estimated
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


def example_tokens(example: dict, count, max_length: int | None = None) -> int:
    """Tokens of one example's training sequences (see module docstring).

    `max_length` caps a conversation as TRL's SFT truncates it. Preference pairs are
    not capped here: how DPO and ORPO truncate and drop pairs is counted apart
    (checks.check_max_lengths)."""
    if "messages" in example:
        tokens = count(example["messages"])
        return min(tokens, max_length) if max_length else tokens
    prompt = example["prompt"]
    if "completion" in example:
        return count(prompt + example["completion"])
    return count(prompt + example["chosen"]) + count(prompt + example["rejected"])


def measured_rows(rows: int) -> list[int]:
    """The rows an estimate measures: all up to SAMPLE_ROWS; beyond, a seeded random sample
    (random, not every k-th row: generated and sorted data often cycle with a period)."""
    if rows <= SAMPLE_ROWS:
        return list(range(rows))
    import random

    return sorted(random.Random(0).sample(range(rows), SAMPLE_ROWS))


def tokens_per_epoch(examples: list[dict], count, max_length: int | None = None) -> int:
    """Every row's tokens up to SAMPLE_ROWS rows; beyond, a sample's scaled up (measured_rows)."""
    if not examples:
        return 0
    picked = measured_rows(len(examples))
    sampled = sum(example_tokens(examples[i], count, max_length) for i in picked)
    return round(sampled * len(examples) / len(picked))


def chat_token_counter(tokenizer):
    """messages -> token count under the tokenizer's chat template."""
    def count(messages: list[dict]) -> int:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    return count


def truncation(spec) -> int | None:
    """The length each training sequence is cut to, where the estimate applies it
    (`Method.estimate_truncates`: SFT)."""
    from posttrain.stages import METHODS

    method = METHODS.get(getattr(spec, "method", None))
    return spec.max_length if method is not None and method.estimate_truncates else None


def estimate_stage(spec, examples: list[dict], count, per_epoch_tokens: int | None = None) -> StageEstimate:
    """A stage's size; `per_epoch_tokens` reuses a count already made for the same rows."""
    per_epoch_steps = steps_per_epoch(len(examples), spec.batch_size, spec.gradient_accumulation)
    steps = total_steps(spec, len(examples))
    if per_epoch_tokens is None:
        per_epoch_tokens = tokens_per_epoch(examples, count, truncation(spec))
    return StageEstimate(examples=len(examples), steps_per_epoch=per_epoch_steps, steps=steps,
                         tokens_per_epoch=per_epoch_tokens,
                         tokens=round(per_epoch_tokens * steps / per_epoch_steps))


def match_steps(target_tokens: int, estimate: StageEstimate) -> int:
    """Optimizer steps after which a stage has processed about `target_tokens`."""
    tokens_per_step = estimate.tokens_per_epoch / estimate.steps_per_epoch
    return max(1, round(target_tokens / tokens_per_step))


# ---------------------------------------------------------------- rows max_length leaves nothing to train

# The three trainers drop, before training, every row whose first trained token lies at or
# past max_length (truncation keeps the start): TRL 1.16's DPO the pairs whose prompt alone
# fills it, its SFT the conversations left fully masked, and stages/orpo.py the same pairs
# as DPO. A stage whose rows are all dropped fails after its upstream stages trained (SFT:
# "num_samples=0", DPO: "torch.cat(): expected a non-empty list"); checks.max_length_problems
# refuses it before anything trains, from these positions.


def first_trained_position(example: dict, tokenizer, *, assistant_masks: bool, add_bos: bool) -> int:
    """Index of the first token an example trains on, as its trainer tokenizes it.

    SFT with `{% generation %}` markers (`assistant_masks`): the first assistant token
    of the whole conversation (TRL masks by the template's assistant mask). SFT without
    them: the last reply's first token (the rest is the prompt, stages/sft.py). DPO and
    ORPO: the end of the prompt rendered with the generation prompt; ORPO (`add_bos`)
    puts the BOS token in front when the tokenizer has one and the prompt lacks it.
    """
    if "messages" in example and assistant_masks:
        out = tokenizer.apply_chat_template(example["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        mask = list(out["assistant_masks"])
        return mask.index(1) if 1 in mask else len(out["input_ids"])
    prompt = example["messages"][:-1] if "messages" in example else example["prompt"]
    ids = list(tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                             add_generation_prompt=True)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    return len(ids) + (1 if add_bos and bos is not None and ids[:1] != [bos] else 0)


@dataclass(frozen=True)
class PromptFill:
    """How many of a stage's rows max_length leaves nothing to train (measured as measured_rows)."""

    rows: int              # rows of the stage's data
    measured: int          # rows measured (all, or a sample of SAMPLE_ROWS)
    dropped: int           # measured rows whose first trained token is at or past max_length
    shortest: int          # the smallest first-trained position measured (tokens before it)

    @property
    def all_dropped(self) -> bool:
        return self.measured > 0 and self.dropped == self.measured

    @property
    def dropped_rows(self) -> int:
        """Dropped rows of the whole data (scaled up from a sample)."""
        return self.dropped if self.measured == self.rows else round(self.dropped * self.rows / self.measured)


def prompt_fill(positions: list[int], rows: int, max_length: int) -> PromptFill:
    """`positions`: first_trained_position of the measured rows."""
    return PromptFill(rows=rows, measured=len(positions), dropped=sum(p >= max_length for p in positions),
                      shortest=min(positions, default=0))
