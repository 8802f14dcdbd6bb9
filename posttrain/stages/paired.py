"""What the paired trainers that tokenize in TRL's older style share (ORPO, CPO/SimPO):
each pair becomes `chosen_*`/`rejected_*` columns with prompt tokens labelled -100."""

from __future__ import annotations

import warnings

from posttrain.errors import DataError
from posttrain.stages.common import (StageContext, StageResult, Trained, finish, load_start,
                                     quiet_trainer, quiet_transformers, eval_dataset, train_dataset, trl_config)


def build_paired(ctx: StageContext, trainer: str, **settings):
    """`trl.experimental.<trainer>`'s trainer for this stage, before training, with the
    settings ORPO and CPO share named once (sequences and completions cut at max_length,
    dropout off) plus the method's `settings`; the pairs whose prompt fills max_length
    dropped (see drop_prompt_only_pairs)."""
    import importlib

    quiet_transformers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental warns on import
        module = importlib.import_module(f"trl.experimental.{trainer}")
    name = {"orpo": "ORPO", "cpo": "CPO"}[trainer]
    model, tokenizer, lora = load_start(ctx)
    args = trl_config(
        getattr(module, f"{name}Config"), ctx,
        **settings,
        max_length=ctx.spec.max_length,
        # TRL 1.16 reads it for encoder-decoder models only; posttrain trains causal LMs, whose
        # pairs are cut at max_length alone (the reply is cut, never the prompt).
        max_completion_length=ctx.spec.max_length,
        disable_dropout=True,
        dataset_num_proc=ctx.spec.dataset_num_proc,
    )
    built = getattr(module, f"{name}Trainer")(model=model, args=args, train_dataset=train_dataset(ctx),
                                              eval_dataset=eval_dataset(ctx),
                                              processing_class=tokenizer, peft_config=lora)
    built.dropped_pairs = drop_prompt_only_pairs(built, ctx)
    return quiet_trainer(built, ctx), tokenizer


def trained_pairs(dataset):
    """Per pair: whether both its chosen and rejected sequences have a token to train on.

    Read from the Arrow columns (labels are -100 on prompt tokens), not row by row.
    """
    import numpy as np

    columns = ("chosen_labels", "rejected_labels")
    table = dataset.select_columns(list(columns)).with_format("arrow")[:]  # rows in the dataset's order
    keep = np.ones(len(dataset), dtype=bool)
    for column in columns:
        labels = table.column(column).combine_chunks()
        offsets = labels.offsets.to_numpy()
        trained = np.concatenate([[0], np.cumsum(labels.flatten().to_numpy(zero_copy_only=False) != -100)])
        keep &= trained[offsets[1:] - offsets[0]] > trained[offsets[:-1] - offsets[0]]
    return keep


def drop_prompt_only_pairs(trainer, ctx: StageContext) -> int:
    """Drop the pairs whose prompt alone fills max_length (as TRL's DPO does); returns how many.

    TRL 1.16's ORPO and CPO keep them with an empty completion, whose mean log-prob is 0/0:
    the loss turns NaN at the first batch holding one, and every weight after it.
    """
    dataset = trainer.train_dataset
    keep = trained_pairs(dataset)
    if not keep.any():
        raise DataError(f"stages.{ctx.name}: every pair's prompt fills max_length ({ctx.spec.max_length} tokens), "
                        f"leaving nothing to train on: raise stages.{ctx.name}.max_length")
    if not keep.all():
        trainer.train_dataset = dataset.select(keep.nonzero()[0])
    return int(len(keep) - keep.sum())


def cut_pairs(done: Trained, rows) -> int:
    """How many of `rows` (pairs with a sequence exactly max_length long) TRL cut: its
    tokenization keeps only the cut sequences, so each pair is tokenized again by the
    trainer's own tokenize_row with the limit lifted (it appends an EOS to every reply, so
    a whole sequence's length is not its template's)."""
    import sys

    trainer = done.trainer
    limit = trainer.max_length
    pairs = trainer.train_dataset.select(rows).select_columns(["prompt", "chosen", "rejected"])
    trainer.max_length = sys.maxsize
    try:
        whole = [trainer.tokenize_row(pair) for pair in pairs]
    finally:
        trainer.max_length = limit
    return sum(max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"])) > limit for row in whole)


def finish_pairs(ctx: StageContext, done: Trained) -> StageResult:
    """finish() for these trainers: their chosen/rejected sequences hold the prompt, cut at
    max_length while tokenizing; the pairs dropped before training are part of the cost."""
    return finish(ctx, done, sequences=(("chosen_input_ids",), ("rejected_input_ids",)), cut_rows=cut_pairs,
                  extra_cost={"dropped_pairs": done.trainer.dropped_pairs})
