"""ORPO: SFT and preference alignment in one step, from the base model, no reference."""

from __future__ import annotations

import warnings

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
    return quiet_trainer(trainer, ctx), tokenizer


def train(ctx: StageContext) -> StageResult:
    with CostMeter() as meter:
        trainer, tokenizer = build_trainer(ctx)
        attempts = run_training(trainer, ctx)
    return finish(ctx, trainer, tokenizer, meter,
                  token_columns={"chosen_input_ids": 1, "rejected_input_ids": 1},
                  sequences_per_example=2, metric_keys=ORPO_METRICS, attempts=attempts)
