"""ORPO: SFT and preference alignment in one step, from the base model, no reference."""

from __future__ import annotations

import warnings
from typing import Literal

from pydantic import Field

from posttrain.recipe.fields import StageBase
from posttrain.stages.common import (StageContext, StageResult, load_start, peft_config, quiet_trainer,
                                     quiet_transformers, train_built, train_dataset, trainer_kwargs)
from posttrain.stages.method import PREFERENCE, Method
from posttrain.stages.paired import drop_prompt_only_pairs, finish_pairs


class ORPOStage(StageBase):
    method: Literal["orpo"]
    beta: float = Field(0.1, gt=0, description="weight of the odds-ratio term (lambda in the paper)")


METHOD = Method(
    name="orpo", settings=ORPOStage, trainer="trl.experimental.orpo.ORPOTrainer", data=PREFERENCE,
    summary="SFT and preference alignment in one stage from the base model (odds-ratio penalty), no reference",
    single_step=True, sequences=2, prompt_bos=True,
    metrics=("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
             "rewards/accuracies", "rewards/margins", "grad_norm"),
    curves=("loss", "nll_loss", "log_odds_ratio", "rewards/margins", "rewards/accuracies"),
)


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


def train(ctx: StageContext) -> StageResult:
    return finish_pairs(ctx, train_built(ctx, build_trainer))
