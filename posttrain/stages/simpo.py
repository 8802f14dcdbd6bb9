"""SimPO: a reference-free preference loss on length-normalised log-probs with a target
margin (Meng et al., 2024): -log sigmoid(beta * (mean logp chosen - mean logp rejected) - gamma).

TRL implements it as CPO's `loss_type: simpo` with no NLL term; this method is that
trainer (posttrain.stages.cpo) with SimPO's settings and defaults. CPO-SimPO (with an
NLL term) is the `cpo` method with `loss_type: simpo`.

Reference-free but not single-step: without an NLL term nothing teaches the model to
answer, so SimPO starts from an SFT model, as in the paper (from the quickstart's
random-init base it trained to 0% correct, on CPU and GPU alike).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from posttrain.recipe.fields import StageBase
from posttrain.stages.common import StageContext, StageResult
from posttrain.stages import cpo
from posttrain.stages.method import PREFERENCE, Method


class SimPOStage(StageBase):
    method: Literal["simpo"]
    # The paper's searched ranges: beta 2.0-2.5, gamma 0.5-1.5 (gamma / beta 0.3-0.8).
    beta: float = Field(2.0, gt=0, description="scale of the length-normalised log-prob difference")
    simpo_gamma: float = Field(1.0, ge=0, description="the target reward margin gamma")


METHOD = Method(
    name="simpo", settings=SimPOStage, trainer="trl.experimental.cpo.CPOTrainer (loss_type simpo, cpo_alpha 0)",
    data=PREFERENCE, summary="SimPO: reference-free preference loss on length-normalised log-probs with a target "
                             "margin, after SFT (no NLL term: it does not teach answering itself)",
    single_step=False, sequences=2, prompt_bos=True, reply_eos=True, metrics=cpo.CPO_METRICS,
    curves=("loss", "rewards/margins", "rewards/accuracies"),   # no NLL term: its nll_loss is 0
)


def loss_settings(spec: SimPOStage) -> dict:
    """The CPO trainer's loss settings that make it SimPO."""
    return {"loss_type": "simpo", "beta": spec.beta, "simpo_gamma": spec.simpo_gamma, "cpo_alpha": 0.0,
            "label_smoothing": 0.0}


def build_trainer(ctx: StageContext):
    """The CPOTrainer set up as SimPO, before training."""
    return cpo.build_trainer(ctx, loss_settings(ctx.spec))


def train(ctx: StageContext) -> StageResult:
    return cpo.train_with(ctx, loss_settings(ctx.spec))
