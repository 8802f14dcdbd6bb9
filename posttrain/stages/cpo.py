"""CPO: contrastive preference optimization -- a preference loss on the policy's own
log-probs plus an NLL term on the chosen replies, no reference (Xu et al., 2024).

`loss_type: simpo` with `cpo_alpha > 0` is CPO-SimPO; the `simpo` method (its own
module) is the pure SimPO loss on the same trainer. Like ORPO, it trains from the
base model in one stage.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from posttrain.recipe.fields import StageBase
from posttrain.stages.common import StageContext, StageResult, train_built
from posttrain.stages.method import PREFERENCE, Method
from posttrain.stages.paired import build_paired, finish_pairs

CPO_METRICS = ("loss", "nll_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "grad_norm")
CPO_CURVES = ("loss", "nll_loss", "rewards/margins", "rewards/accuracies")


class CPOStage(StageBase):
    method: Literal["cpo"]
    beta: float = Field(0.1, gt=0, description="scale of the log-prob difference in the preference loss")
    cpo_alpha: float = Field(1.0, ge=0, description="weight of the NLL term on chosen replies")
    simpo_gamma: float = Field(0.5, ge=0, description="loss_type simpo: the target reward margin")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="loss_type sigmoid: conservative smoothing")
    loss_type: Literal["sigmoid", "hinge", "ipo", "simpo"] = Field(
        "sigmoid", validate_default=True, description="sigmoid (CPO), hinge, ipo, or simpo (CPO-SimPO)")

    @field_validator("loss_type")
    @classmethod
    def _loss_settings(cls, loss_type: str, info: ValidationInfo) -> str:
        # TRL's CPO reads simpo_gamma only for simpo and label_smoothing only for sigmoid:
        # a setting the chosen loss ignores is a mistake, said before anything trains.
        if info.data.get("simpo_gamma", 0.5) != 0.5 and loss_type != "simpo":
            raise ValueError(f"simpo_gamma is read only by loss_type simpo, not {loss_type}")
        if info.data.get("label_smoothing") and loss_type != "sigmoid":
            raise ValueError(f"label_smoothing is read only by loss_type sigmoid, not {loss_type}")
        return loss_type


METHOD = Method(
    name="cpo", settings=CPOStage, trainer="trl.experimental.cpo.CPOTrainer", data=PREFERENCE,
    summary="contrastive preference optimization: a reference-free preference loss plus NLL on chosen, "
            "in one stage from the base model (loss_type simpo: CPO-SimPO)",
    single_step=True, sequences=2, prompt_bos=True, reply_eos=True, metrics=CPO_METRICS, curves=CPO_CURVES,
)


def build_trainer(ctx: StageContext, loss: dict | None = None):
    """The CPOTrainer for this stage, before training. `loss`: beta, loss_type, cpo_alpha,
    simpo_gamma and label_smoothing (default: the stage's own settings)."""
    loss = loss or {name: getattr(ctx.spec, name) for name in
                    ("beta", "loss_type", "cpo_alpha", "simpo_gamma", "label_smoothing")}
    # SimPO's mean log-prob of an empty completion is 0/0 as ORPO's is: build_paired drops such pairs.
    return build_paired(ctx, "cpo", **loss,
                        alpha=0.0,                 # AlphaPO's reward shape off: log-prob rewards
                        generate_during_eval=False,
                        is_encoder_decoder=False)


def train_with(ctx: StageContext, loss: dict | None = None) -> StageResult:
    """Train with the given loss settings (see build_trainer): CPO's and SimPO's `train`."""
    return finish_pairs(ctx, train_built(ctx, lambda ctx: build_trainer(ctx, loss)))


def train(ctx: StageContext) -> StageResult:
    return train_with(ctx)
