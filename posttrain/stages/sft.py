"""SFT: supervised fine-tuning on chat examples, loss on assistant tokens only."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.models import template_has_generation_markers
from posttrain.recipe.fields import StageBase
from posttrain.stages.common import (StageContext, StageResult, finish, load_start, quiet_trainer,
                                     quiet_transformers, train_built, eval_dataset, train_dataset, trl_config)
from posttrain.stages.method import INSTRUCTION, Method


class SFTStage(StageBase):
    method: Literal["sft"]
    packing: bool = Field(False, description="pack conversations into max_length rows (TRL's best-fit packing)")
    padding_free: bool = Field(False, description="batches as one row without padding (flash attention)")
    KEY_OMITS_DEFAULT = ("packing", "padding_free")

    @model_validator(mode="after")
    def _padding_free_packs(self):
        # TRL 1.16's SFTTrainer refuses padding-free rows without packing when max_length
        # is set (it could not enforce it), and posttrain always sets max_length.
        if self.padding_free and not self.packing:
            raise ValueError("padding_free needs packing: true (TRL 1.16 cannot enforce max_length on "
                             "padding-free rows that are not packed)")
        return self


METHOD = Method(
    name="sft", settings=SFTStage, trainer="trl.SFTTrainer", data=INSTRUCTION,
    summary="supervised fine-tuning on conversations; loss on the assistant's tokens only",
    metrics=("loss", "mean_token_accuracy", "grad_norm"), curves=("loss", "mean_token_accuracy"), sequences=1,
)


def to_prompt_completion(example: dict) -> dict:
    """Fallback for templates without `{% generation %}` markers: train the last reply."""
    messages = example["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def sft_dataset(dataset, tokenizer):
    """Choose how prompt tokens are masked, by what the chat template supports.

    With generation markers TRL masks every non-assistant token (multi-turn aware);
    otherwise the conversation before the last reply becomes the prompt and TRL's
    completion-only loss masks it.
    """
    if template_has_generation_markers(tokenizer):
        return dataset, True
    return dataset.map(to_prompt_completion, remove_columns=dataset.column_names), False


def build_trainer(ctx: StageContext):
    """The SFTTrainer for this stage, before training (tests inspect its batches)."""
    quiet_transformers()
    from trl import SFTConfig, SFTTrainer

    model, tokenizer, lora = load_start(ctx)
    dataset, assistant_masks = sft_dataset(train_dataset(ctx), tokenizer)
    held_out = eval_dataset(ctx)
    if held_out is not None:
        held_out = sft_dataset(held_out, tokenizer)[0]
    spec = ctx.spec
    args = trl_config(
        SFTConfig, ctx,
        max_length=spec.max_length,
        truncation_mode="keep_start",
        # Packing (TRL's best-fit decreasing, position ids reset per conversation) and
        # padding-free batches keep each token's loss mask; off by default.
        packing=spec.packing,
        padding_free=spec.padding_free,
        assistant_only_loss=assistant_masks,
        completion_only_loss=not assistant_masks,
        dataset_num_proc=spec.dataset_num_proc,
        shuffle_dataset=True,
        activation_offloading=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=held_out, processing_class=tokenizer,
                         peft_config=lora)
    return quiet_trainer(trainer, ctx), tokenizer


def cut_conversations(done, rows) -> int:
    """How many of `rows` (trained rows exactly max_length long) TRL cut: its tokenization
    keeps only the cut ids, so each one's conversation is tokenized again, whole, as TRL
    tokenizes it (the chat template over the conversation, or prompt + completion)."""
    dataset, tokenizer = done.trainer.train_dataset, done.tokenizer
    limit = done.trainer.args.max_length
    if "seq_lengths" in dataset.column_names:
        # Packed rows keep no conversation; TRL's best-fit packing cut each conversation to
        # max_length before packing it, so one that fills a row alone is the cut one (one
        # exactly max_length tokens long is counted too: its length alone cannot tell).
        return sum(length == limit for row in dataset.select(rows) for length in row["seq_lengths"])
    cut = 0
    for row in dataset.select(rows):
        conversation = row["messages"] if "messages" in row else row["prompt"] + row["completion"]
        cut += len(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]) > limit
    return cut


def train(ctx: StageContext) -> StageResult:
    return finish(ctx, train_built(ctx, build_trainer), sequences=(("input_ids",),), cut_rows=cut_conversations)
