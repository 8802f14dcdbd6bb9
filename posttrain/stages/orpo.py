"""ORPO: SFT and preference alignment in one step, from the base model, no reference."""

from __future__ import annotations

import warnings

from posttrain.errors import DataError
from posttrain.stages.common import (CostMeter, StageContext, StageResult, finish, load_start, peft_config,
                                     quiet_trainer, quiet_transformers, run_training, train_dataset, trainer_kwargs)

ORPO_METRICS = ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen",
                "rewards/rejected", "rewards/accuracies", "rewards/margins", "grad_norm")


def build_trainer(ctx: StageContext):
    """The ORPOTrainer for this stage, before training."""
    quiet_transformers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental warns on import
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model, tokenizer = load_start(ctx)
    spec = ctx.spec
    args = ORPOConfig(
        **trainer_kwargs(ctx),
        beta=spec.beta,
        max_length=spec.max_length,
        max_completion_length=spec.max_length,
        disable_dropout=True,
        dataset_num_proc=None,
    )
    trainer = ORPOTrainer(model=model, args=args, train_dataset=train_dataset(ctx),
                          processing_class=tokenizer, peft_config=peft_config(ctx))
    trainer.dropped_pairs = drop_prompt_only_pairs(trainer, ctx)
    return quiet_trainer(trainer, ctx), tokenizer


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

    TRL 1.16's ORPO keeps them with an empty completion, whose mean log-prob is 0/0:
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


def train(ctx: StageContext) -> StageResult:
    with CostMeter() as meter:
        trainer, tokenizer = build_trainer(ctx)
        attempts = run_training(trainer, ctx)
    return finish(ctx, trainer, tokenizer, meter,
                  token_columns={"chosen_input_ids": 1, "rejected_input_ids": 1},
                  sequences_per_example=2, metric_keys=ORPO_METRICS, attempts=attempts,
                  extra_cost={"dropped_pairs": trainer.dropped_pairs})
