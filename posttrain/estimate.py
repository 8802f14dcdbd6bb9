"""Size of a stage before it runs: examples, optimizer steps, train tokens; compute matching.

Tokens are counted the way a finished stage reports them (stages/common.finish): the
sequences TRL builds from the chat template, each cut at max_length as TRL cuts it, over
the rows it keeps. An SFT example is its whole conversation; a preference pair is
prompt+chosen plus prompt+rejected (DPO, ORPO, CPO alike; ORPO and CPO put a BOS before a
prompt that lacks one and an EOS after a reply that lacks one); an unpaired example (KTO)
is prompt+completion. Every trainer drops the rows whose first trained token lies at or
past max_length (first_trained_position). Datasets over SAMPLE_ROWS rows are estimated
from a seeded random sample of rows, scaled to the whole.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

SAMPLE_ROWS = 2000


@dataclass(frozen=True)
class EpochSize:
    """What one epoch of a stage trains (scaled up from a sample beyond SAMPLE_ROWS rows)."""

    rows: int        # rows of the stage's data
    dropped: int     # rows the trainer drops: max_length leaves nothing to train
    truncated: int   # rows kept with a sequence cut at max_length
    tokens: int      # tokens of the kept rows' sequences, each cut at max_length

    @property
    def kept(self) -> int:
        return self.rows - self.dropped


@dataclass(frozen=True)
class StageEstimate:
    examples: int          # rows given (the trainer keeps examples - dropped)
    steps_per_epoch: int
    steps: int
    tokens_per_epoch: int
    tokens: int
    dropped: int = 0
    truncated: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def epoch(self) -> EpochSize:
        return EpochSize(self.examples, self.dropped, self.truncated, self.tokens_per_epoch)


def steps_per_epoch(examples: int, batch_size: int, gradient_accumulation: int) -> int:
    """transformers' count: batches per epoch, then optimizer steps (a partial last one counts)."""
    batches = math.ceil(examples / batch_size)
    return max(1, math.ceil(batches / gradient_accumulation))


def total_steps(spec, examples: int) -> int:
    if spec.max_steps:
        return spec.max_steps
    return max(1, math.ceil(spec.epochs * steps_per_epoch(examples, spec.batch_size, spec.gradient_accumulation)))


def measured_rows(rows: int) -> list[int]:
    """The rows an estimate measures: all up to SAMPLE_ROWS; beyond, a seeded random sample
    (random, not every k-th row: generated and sorted data often cycle with a period)."""
    if rows <= SAMPLE_ROWS:
        return list(range(rows))
    import random

    return sorted(random.Random(0).sample(range(rows), SAMPLE_ROWS))


# ---------------------------------------------------------------- sequences as the trainers build them


@dataclass(frozen=True)
class Tokenization:
    """What a method's trainer adds to the chat-templated sequences (ORPO/CPO: a BOS before a
    prompt that lacks one, where the tokenizer has one; an EOS after a reply that lacks it)."""

    bos: bool = False
    eos: bool = False


def tokenization(method, tokenizer) -> Tokenization:
    """A method's Tokenization with this tokenizer (`method`: a stages.method.Method)."""
    return Tokenization(bos=method.prompt_bos and getattr(tokenizer, "bos_token_id", None) is not None,
                        eos=method.reply_eos and getattr(tokenizer, "eos_token_id", None) is not None)


def conversations(example: dict) -> list[list[dict]]:
    """The conversations a row trains as, one sequence each."""
    if "messages" in example:
        return [example["messages"]]
    prompt = example["prompt"]
    if "completion" in example:
        return [prompt + example["completion"]]
    return [prompt + example["chosen"], prompt + example["rejected"]]


def chat_ids(tokenizer, conversation: list[dict], example: dict | None = None, **kwargs) -> list[int]:
    """A conversation's token ids under the chat template, with the row's tools as TRL passes them."""
    tools = (example or {}).get("tools")
    if tools is not None:
        kwargs["tools"] = json.loads(tools) if isinstance(tools, str) else tools
    return list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, **kwargs)["input_ids"])


@dataclass(frozen=True)
class Measured:
    """One row, measured once for every method that reads its data."""

    first: int                  # first trained position (first_trained_position, no BOS added)
    lengths: tuple[int, ...]    # each sequence's tokens under the chat template
    bos: bool                   # the sequences start with the tokenizer's BOS
    eos: tuple[bool, ...]       # each sequence ends with the tokenizer's EOS

    def under(self, shape: Tokenization) -> tuple[int, tuple[int, ...]]:
        """(first trained position, sequence lengths) as a trainer adding `shape` builds them."""
        bos = int(shape.bos and not self.bos)
        return self.first + bos, tuple(n + bos + int(shape.eos and not eos) for n, eos in zip(self.lengths, self.eos))


def measure(examples: list[dict], tokenizer) -> list[Measured]:
    """The measured rows (measured_rows) of a dataset, for any method and max_length."""
    from posttrain.models import template_has_generation_markers

    masks = template_has_generation_markers(tokenizer)   # as stages/sft.py decides
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    rows = []
    for i in measured_rows(len(examples)):
        ids = [chat_ids(tokenizer, conversation, examples[i]) for conversation in conversations(examples[i])]
        rows.append(Measured(first=first_trained_position(examples[i], tokenizer, assistant_masks=masks, add_bos=False),
                             lengths=tuple(map(len, ids)), bos=bos is not None and ids[0][:1] == [bos],
                             eos=tuple(eos is not None and sequence[-1:] == [eos] for sequence in ids)))
    return rows


def epoch_size(measured: list[Measured], rows: int, max_length: int, shape: Tokenization = Tokenization()) -> EpochSize:
    """One epoch of `rows` rows at `max_length` for a trainer adding `shape`, from the
    measured rows (see `measure`)."""
    dropped = truncated = tokens = 0
    for row in measured:
        first, lengths = row.under(shape)
        if first >= max_length:
            dropped += 1
            continue
        truncated += any(length > max_length for length in lengths)
        tokens += sum(min(length, max_length) for length in lengths)
    scale = rows / len(measured) if measured else 0.0
    return EpochSize(rows=rows, dropped=round(dropped * scale), truncated=round(truncated * scale),
                     tokens=round(tokens * scale))


def estimate_stage(spec, epoch: EpochSize) -> StageEstimate:
    """A stage's size: steps over the rows its trainer keeps, tokens per epoch scaled to its steps.
    With SFT packing the rows are packed ones: TRL's best-fit packing fills rows of
    max_length nearly full, so about tokens / max_length of them (an estimate, not exact)."""
    rows = epoch.kept
    if getattr(spec, "packing", False):
        rows = max(1, math.ceil(epoch.tokens / spec.max_length))
    per_epoch_steps = steps_per_epoch(rows, spec.batch_size, spec.gradient_accumulation)
    steps = total_steps(spec, rows)
    return StageEstimate(examples=epoch.rows, steps_per_epoch=per_epoch_steps, steps=steps,
                         tokens_per_epoch=epoch.tokens, tokens=round(epoch.tokens * steps / per_epoch_steps),
                         dropped=epoch.dropped, truncated=epoch.truncated)


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
