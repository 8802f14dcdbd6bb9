"""KTO: alignment from unpaired judgements -- each completion labelled desirable or not --
against a frozen reference, the model the stage starts from (Ethayarajh et al., 2024).

It reads labelled completions (`{"prompt", "completion", "label"}`), or preference
pairs unpaired as TRL does (chosen: desirable, rejected: undesirable;
`posttrain.data.formats.to_kind`). The reference is the starting model: its
log-probs precomputed once, or a frozen copy, or (LoRA) the adapter disabled.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from posttrain.recipe.fields import StageBase
from posttrain.stages.common import (StageContext, StageResult, finish, quiet_trainer,
                                     quiet_transformers, reference_config, start_with_reference, train_built, eval_dataset, train_dataset,
                                     trl_config)
from posttrain.stages.method import REFERENCE_START, UNPAIRED, Method


class KTOStage(StageBase):
    method: Literal["kto"]
    beta: float = Field(0.1, gt=0, description="deviation from the reference")
    desirable_weight: float = Field(1.0, gt=0, description="weight of desirable completions' losses")
    undesirable_weight: float = Field(1.0, gt=0, description="weight of undesirable completions' losses")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", validate_default=True, description="kto, or apo_zero_unpaired (no KL term)")
    precompute_ref_log_probs: bool = Field(True, description="score completions with the reference once before "
                                                             "training")

    @field_validator("loss_type")
    @classmethod
    def _kl_needs_a_batch(cls, loss_type: str, info: ValidationInfo) -> str:
        # TRL refuses it when the trainer is built: the KL term pairs each prompt with its
        # neighbour's completion in the batch, which a batch of one does not have.
        if loss_type == "kto" and info.data.get("batch_size") == 1:
            raise ValueError("the kto loss needs batch_size >= 2 (its KL term pairs each prompt with another "
                             "completion of the same batch)")
        return loss_type


METHOD = Method(
    name="kto", settings=KTOStage, trainer="trl.KTOTrainer", data=UNPAIRED, reference=REFERENCE_START,
    summary="alignment from completions labelled desirable or not (or pairs, unpaired), against a frozen "
            "reference, the model the stage starts from",
    sequences=1,
    metrics=("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
             "logps/rejected", "grad_norm"),
    curves=("loss", "kl", "rewards/margins"),
)


def build_trainer(ctx: StageContext):
    """The KTOTrainer for this stage, before training."""
    quiet_transformers()
    from trl import KTOConfig, KTOTrainer

    model, tokenizer, lora, ref_model = start_with_reference(ctx)
    spec = ctx.spec
    args = trl_config(
        KTOConfig, ctx,
        **reference_config(ctx),
        beta=spec.beta,
        loss_type=spec.loss_type,
        desirable_weight=spec.desirable_weight,
        undesirable_weight=spec.undesirable_weight,
        # The KL term pairs each row with its neighbour in a fixed-order batch (TRL requires
        # sequential sampling); the rows are shuffled once, by the seed, below instead.
        train_sampling_strategy="sequential",
        pad_to_multiple_of=None,
    )
    # Unpaired rows arrive in file order (unpaired pairs: chosen, rejected, next pair): in
    # order, a batch would hold one prompt twice and the KL term would pair it with itself.
    dataset = train_dataset(ctx).shuffle(seed=ctx.seed)
    trainer = KTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset, eval_dataset=eval_dataset(ctx),
                         processing_class=tokenizer, peft_config=lora)
    return quiet_trainer(trainer, ctx), tokenizer


def train(ctx: StageContext) -> StageResult:
    done = train_built(ctx, build_trainer)
    # Without a backward: the policy's KL sequence (each prompt with its neighbour's
    # completion) per example and epoch, and the reference's scores of both sequences.
    kl = done.trainer.args.loss_type == "kto"
    policy_kl = round(len(done.trainer.train_dataset) * done.epochs) if kl else 0
    reference = done.reference_forwards(ctx.spec.precompute_ref_log_probs, per_example=2 if kl else 1)
    # The collator cuts prompt+completion at max_length (the KL sequences are forwards only).
    return finish(ctx, done, sequences=(("prompt_ids", "completion_ids"),),
                  extra_forwards=reference + policy_kl)
