"""DPO: preference tuning against a frozen reference — the model this stage starts from.

In `sft -> dpo` the reference is the SFT output: either its log-probs are
precomputed once before training (`precompute_ref_log_probs`), or a frozen copy is
kept; with LoRA the reference is the same model with the adapter disabled.
"""

from __future__ import annotations

import copy

from posttrain.stages.common import (CostMeter, StageContext, StageResult, finish, load_start,
                                     peft_config, quiet_trainer, quiet_transformers, trainer_kwargs)

DPO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "grad_norm")


def build_trainer(ctx: StageContext):
    """The DPOTrainer for this stage, before training (tests inspect its reference)."""
    quiet_transformers()
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = load_start(ctx)
    spec = ctx.spec
    lora = peft_config(ctx)
    # Without LoRA or precomputation TRL would rebuild the reference from the
    # model's hub name; pass a frozen copy of the starting model instead, explicitly.
    ref_model = None
    if lora is None and not spec.precompute_ref_log_probs:
        ref_model = copy.deepcopy(model).eval()
    args = DPOConfig(
        **trainer_kwargs(ctx),
        beta=spec.beta,
        loss_type=[spec.loss_type],
        max_length=spec.max_length,
        truncation_mode="keep_start",
        precompute_ref_log_probs=spec.precompute_ref_log_probs,
        precompute_ref_batch_size=spec.batch_size,
        disable_dropout=True,
        padding_free=False,
        sync_ref_model=False,
        label_smoothing=0.0,
        use_weighting=False,
        activation_offloading=False,
        dataset_num_proc=None,
    )
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args,
                         train_dataset=Dataset.from_list(ctx.examples), processing_class=tokenizer,
                         peft_config=lora)
    return quiet_trainer(trainer, ctx), tokenizer


def train(ctx: StageContext) -> StageResult:
    with CostMeter() as meter:
        trainer, tokenizer = build_trainer(ctx)
        trainer.train()
    # The reference scores chosen and rejected too: once per pair up front when
    # precomputed, else alongside every policy step (with LoRA: adapter disabled).
    pairs = len(trainer.train_dataset)
    epochs = trainer.state.epoch or 0.0
    reference_forwards = 2 * pairs if ctx.spec.precompute_ref_log_probs else round(2 * pairs * epochs)
    return finish(ctx, trainer, tokenizer, meter, token_columns={"prompt_ids": 2, "chosen_ids": 1, "rejected_ids": 1},
                  sequences_per_example=2, metric_keys=DPO_METRICS, reference_forwards=reference_forwards)
