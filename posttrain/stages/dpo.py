"""DPO: preference tuning against a frozen reference — the model this stage starts from.

In `sft -> dpo` the reference is the SFT output: either its log-probs are
precomputed once before training (`precompute_ref_log_probs`), or a frozen copy is
kept; with LoRA the reference is the same model with the adapter disabled.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from posttrain.artifacts import Area
from posttrain.recipe.fields import StageBase
from posttrain.stages.common import (StageContext, StageResult, device, finish, quiet_trainer,
                                     quiet_transformers, reference_config, start_with_reference, train_built, eval_dataset, train_dataset,
                                     trl_config)

from posttrain.stages.method import PREFERENCE, REFERENCE_START, Method

# Every single loss TRL 1.16's DPOTrainer accepts (DPOConfig.loss_type; the trainer's
# loss switch). Combinations of several (loss_weights) are not offered.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                  "sft", "sigmoid_norm")
# Losses that read label_smoothing (TRL's loss switch): robust (the flip rate), exo_pair
# (its epsilon, which must be > 0), aot and aot_unpaired (conservative smoothing).
SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")


class DPOStage(StageBase):
    method: Literal["dpo"]
    beta: float = Field(0.1, gt=0, description="deviation from the reference (IPO: its tau)")
    # Declared before loss_type, whose check reads them (a stage key does not depend on field order).
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description=(
        "robust: the rate of flipped labels (0.1 in the paper); exo_pair: epsilon, > 0 (1e-3 in the paper); "
        "aot/aot_unpaired: conservative smoothing"))
    discopop_tau: float = Field(0.05, gt=0, description="discopop: the log-ratio modulation's temperature")
    loss_type: Literal[DPO_LOSS_TYPES] = Field(  # type: ignore[valid-type]
        "sigmoid", validate_default=True, description="one of TRL's DPO losses (ipo: IPO; sigmoid: DPO)")
    precompute_ref_log_probs: bool = Field(True, description=(
        "score chosen/rejected with the reference once before training (cached per reference and pairs)"))

    # Added after stage keys were first published: left out of the key at their defaults.
    KEY_OMITS_DEFAULT: ClassVar[tuple[str, ...]] = ("label_smoothing", "discopop_tau")

    @field_validator("loss_type")
    @classmethod
    def _loss_settings(cls, loss_type: str, info: ValidationInfo) -> str:
        # TRL refuses exo_pair at label_smoothing 0 when the trainer is built, after the
        # stages before it trained: said here instead. A setting no loss reads is a mistake.
        smoothing, tau = info.data.get("label_smoothing", 0.0), info.data.get("discopop_tau", 0.05)
        if loss_type == "exo_pair" and smoothing == 0:
            raise ValueError("exo_pair needs label smoothing: set label_smoothing > 0 (the EXO paper uses 1e-3)")
        if smoothing and loss_type not in SMOOTHED_LOSSES:
            raise ValueError(f"label_smoothing {smoothing:g} is read only by the {', '.join(SMOOTHED_LOSSES)} "
                             f"losses, not {loss_type}")
        if tau != 0.05 and loss_type != "discopop":
            raise ValueError(f"discopop_tau is read only by the discopop loss, not {loss_type}")
        return loss_type


METHOD = Method(
    name="dpo", settings=DPOStage, trainer="trl.DPOTrainer", data=PREFERENCE, reference=REFERENCE_START,
    summary="preference tuning against a frozen reference, the model the stage starts from; "
            f"losses: {', '.join(DPO_LOSS_TYPES)}",
    sequences=2,
    metrics=("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected", "mean_token_accuracy", "grad_norm"),
    curves=("loss", "rewards/margins", "rewards/accuracies", "mean_token_accuracy"),
)


def pairs_digest(dataset) -> str:
    """A content hash of tokenized pairs (prompt/chosen/rejected token ids, in order)."""
    digest = hashlib.sha256()
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        values = dataset.data.column(column).combine_chunks()
        digest.update(column.encode())
        digest.update(values.value_lengths().to_numpy(zero_copy_only=False).astype("int64").tobytes())
        digest.update(values.flatten().to_numpy(zero_copy_only=False).astype("int64").tobytes())
    return digest.hexdigest()


def reflogps_key(ctx: StageContext, dataset, batch_size: int) -> str:
    """What reference log-probs depend on: the reference model, the tokenized pairs,
    truncation, and how they are batched and computed (padding and dtype move the last bits)."""
    payload = [ctx.start_key, pairs_digest(dataset), ctx.spec.max_length, "keep_start", batch_size,
               device(), ctx.start.dtype]
    return hashlib.sha256(repr(payload).encode()).hexdigest()


def with_ref_columns(dataset, chosen, rejected):
    """Add cached log-probs exactly as TRL's precompute does (float32 columns)."""
    from datasets import Dataset, Features, Value, concatenate_datasets

    columns = Dataset.from_dict({"ref_chosen_logps": chosen, "ref_rejected_logps": rejected},
                                features=Features({"ref_chosen_logps": Value("float32"),
                                                   "ref_rejected_logps": Value("float32")}))
    return concatenate_datasets([dataset, columns], axis=1)


def trainer_class(ctx: StageContext):
    """DPOTrainer, with its reference precompute cached per (reference, pairs).

    TRL caches precomputed log-probs only beside one dataset fingerprint, which
    changes with every DPOConfig setting (beta, learning rate, output dir); keyed by
    the reference model's stage key instead, they are computed once and reused by
    every seed with the same reference, every sweep point and every resume.
    """
    from trl import DPOTrainer

    if ctx.reflogps_dir is None or ctx.start_key is None or not hasattr(DPOTrainer, "_precompute_ref_logps"):
        return DPOTrainer

    class CachedReferenceDPOTrainer(DPOTrainer):
        reference_cached = False

        def _precompute_ref_logps(self, dataset, name, batch_size):
            import numpy as np

            from accelerate.utils import broadcast_object_list

            path = ctx.reflogps_dir / f"{reflogps_key(ctx, dataset, batch_size)}.npz"
            stored = load_reflogps(path)
            # Rank 0's look decides for every rank: computing is collective (a gather).
            cached = [stored is not None and len(stored["chosen"]) == len(dataset)]
            if self.accelerator.num_processes > 1:
                broadcast_object_list(cached, from_process=0)
            if cached[0]:
                stored = stored or load_reflogps(path)
                type(self).reference_cached = True
                return with_ref_columns(dataset, stored["chosen"], stored["rejected"])
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            if self.accelerator.is_main_process:
                buffer = io.BytesIO()
                np.savez(buffer, chosen=np.asarray(out["ref_chosen_logps"], dtype="float32"),
                         rejected=np.asarray(out["ref_rejected_logps"], dtype="float32"))
                Area(ctx.reflogps_dir.parent).write_bytes(path, buffer.getvalue())  # the cache root
            return out

    return CachedReferenceDPOTrainer


def load_reflogps(path: Path) -> dict | None:
    """Cached reference log-probs, or None when absent or unreadable (then recomputed)."""
    import zipfile

    import numpy as np

    if not path.is_file():
        return None
    try:
        with np.load(path) as stored:
            arrays = {"chosen": stored["chosen"], "rejected": stored["rejected"]}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    finite = np.isfinite(arrays["chosen"]).all() and np.isfinite(arrays["rejected"]).all()
    return arrays if finite and len(arrays["chosen"]) == len(arrays["rejected"]) else None


def build_trainer(ctx: StageContext):
    """The DPOTrainer for this stage, before training (tests inspect its reference)."""
    quiet_transformers()
    from trl import DPOConfig

    model, tokenizer, lora, ref_model = start_with_reference(ctx)
    spec = ctx.spec
    args = trl_config(
        DPOConfig, ctx,
        **reference_config(ctx),
        beta=spec.beta,
        loss_type=[spec.loss_type],
        truncation_mode="keep_start",
        padding_free=False,
        label_smoothing=spec.label_smoothing,
        discopop_tau=spec.discopop_tau,
        loss_weights=None,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        use_weighting=False,
    )
    trainer = trainer_class(ctx)(model=model, ref_model=ref_model, args=args, train_dataset=train_dataset(ctx),
                                 eval_dataset=eval_dataset(ctx),
                                 processing_class=tokenizer, peft_config=lora)
    return quiet_trainer(trainer, ctx), tokenizer


def train(ctx: StageContext) -> StageResult:
    done = train_built(ctx, build_trainer)
    # The reference scores chosen and rejected of every pair (with LoRA: adapter disabled).
    cached = bool(getattr(done.trainer, "reference_cached", False))
    # The collator cuts prompt+chosen and prompt+rejected at max_length, each apart.
    return finish(ctx, done, sequences=(("prompt_ids", "chosen_ids"), ("prompt_ids", "rejected_ids")),
                  extra_forwards=done.reference_forwards(ctx.spec.precompute_ref_log_probs, per_example=2),
                  extra_cost={"reference_logps_cached": cached})
