"""ORPO: SFT and preference alignment in one step, from the base model, no reference."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from posttrain.recipe.fields import StageBase
from posttrain.stages.common import StageContext, StageResult, train_built
from posttrain.stages.method import PREFERENCE, Method
from posttrain.stages.paired import build_paired, finish_pairs


class ORPOStage(StageBase):
    method: Literal["orpo"]
    beta: float = Field(0.1, gt=0, description="weight of the odds-ratio term (lambda in the paper)")


METHOD = Method(
    name="orpo", settings=ORPOStage, trainer="trl.experimental.orpo.ORPOTrainer", data=PREFERENCE,
    summary="SFT and preference alignment in one stage from the base model (odds-ratio penalty), no reference",
    single_step=True, sequences=2, prompt_bos=True, reply_eos=True,
    metrics=("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/rejected",
             "rewards/accuracies", "rewards/margins", "grad_norm"),
    curves=("loss", "nll_loss", "log_odds_ratio", "rewards/margins", "rewards/accuracies"),
)


def build_trainer(ctx: StageContext):
    """The ORPOTrainer for this stage, before training."""
    return build_paired(ctx, "orpo", beta=ctx.spec.beta)


def train(ctx: StageContext) -> StageResult:
    return finish_pairs(ctx, train_built(ctx, build_trainer))
