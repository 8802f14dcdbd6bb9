"""The building blocks every recipe section and every method's settings share.

Strict models (unknown keys, NaN/inf and out-of-range integers refused), the
common stage settings every training method has, and LoRA. A method's own
settings subclass `StageBase` in its module under `posttrain/stages/`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
              "polynomial", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")

# transformers' OptimizerNames (5.24), written out: `validate` imports no transformers
# (tests/test_stage_settings.py checks the list against the enum). 8-bit and paged
# optimizers need bitsandbytes (checked before training).
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused",
              "adafactor", "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd",
              "adagrad", "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit",
              "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit",
              "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
              "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor",
              "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo",
              "adalomo", "grokadamw", "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw",
              "apollo_adamw_layerwise", "stable_adamw")
BNB_OPTIMIZERS = tuple(name for name in OPTIMIZERS if "8bit" in name or "bnb" in name or name.startswith("paged_"))

# The largest whole number any setting takes. Libraries take counts and seeds as C
# integers (torch and tokenizers overflow at 2**64, numpy seeds stop at 2**32 - 1), so
# a larger value is a typo that would crash only after training had started.
INT_MAX = 2**32 - 1
# Seeds go to random, numpy, torch and transformers.set_seed: numpy takes 0..2**32 - 1.
Seed = Annotated[int, Field(ge=0, le=INT_MAX)]
# A name, path or id: an empty one means nothing and fails far from the recipe.
Text = Annotated[str, Field(min_length=1)]


class Strict(BaseModel):
    # allow_inf_nan=False: no float setting takes .inf or .nan (`learning_rate: .inf`
    # passed validation, and `epochs: .inf` crashed `plan`).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _sane_values(cls, value: Any) -> Any:
        """In every spec: every int is at most INT_MAX (see there), and no string holds a
        NUL character (no path, id or name can; C libraries would cut it there). Keys of
        a mapping are names: _name_problems checks them."""
        items = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, int) and not isinstance(item, bool) and abs(item) > INT_MAX:
                raise ValueError(f"must be <= {INT_MAX} (2**32 - 1)")
            if isinstance(item, str) and "\x00" in item:
                raise ValueError(f"{item!r} contains a NUL character")
        return value


class LoraSpec(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # An empty list passed validate and plan, then peft refused it once training started.
    target_modules: Union[Literal["all-linear"], Annotated[list[Text], Field(min_length=1)]] = "all-linear"

    @field_validator("target_modules", mode="wrap")
    @classmethod
    def _targets(cls, value: Any, handler) -> Any:
        """One message for both shapes (pydantic would report each union member apart)."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("must be all-linear or a non-empty list of module names "
                             "(e.g. [q_proj, v_proj])") from None



SLURM_TIME = r"^(?:\d+-)?\d+(?::\d{1,2}){0,2}$"   # sbatch --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S


MAX_JOB_MINUTES = 366 * 24 * 60


def time_minutes(value: int | str) -> int:
    """A job's time limit in whole minutes (rounded up) from minutes or sbatch's --time forms."""
    if isinstance(value, int):
        return value
    days, _, clock = value.rpartition("-")
    parts = [int(part) for part in clock.split(":")]
    if days:   # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return int(days) * 1440 + hours * 60 + minutes + (seconds > 0)
    if len(parts) == 3:
        return parts[0] * 60 + parts[1] + (parts[2] > 0)
    return parts[0] + (len(parts) == 2 and parts[1] > 0)   # M or M:S


class ResourcesSpec(Strict):
    """What a cluster job asks for (`posttrain run --executor slurm`); how a stage runs,
    never what it computes: no stage key holds it."""

    gpus: int | None = Field(None, ge=0, le=64, description="GPUs per node; one task each")
    cpus: int | None = Field(None, gt=0, le=1024, description="CPUs per task")
    mem_gb: float | None = Field(None, gt=0, description="memory per node, GB")
    time: int | str | None = Field(None, description="time limit: minutes, or sbatch's H:MM:SS / D-HH:MM:SS")
    partition: Text | None = None
    account: Text | None = None
    qos: Text | None = None
    constraint: Text | None = None
    nodes: int | None = Field(None, gt=0, le=1024)

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, value: Any) -> Any:
        form = ("minutes (a whole number) or sbatch's time form: H:MM:SS, D-HH:MM:SS, D-HH, M:SS "
                "(e.g. 4:00:00)")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"must be {form}")
        if isinstance(value, int) and not 0 < value <= MAX_JOB_MINUTES:
            raise ValueError(f"must be > 0 and <= {MAX_JOB_MINUTES} (minutes: a year)")
        if isinstance(value, str) and not re.fullmatch(SLURM_TIME, value):
            raise ValueError(f"must be {form}")
        if time_minutes(value) <= 0:
            raise ValueError("must be at least one minute")
        return value


class StageBase(Strict):
    data: str
    learning_rate: float = Field(gt=0)
    # Bounded so that epochs x steps per epoch stays a finite integer (1e308 overflowed `plan`).
    epochs: float = Field(1.0, gt=0, le=100_000)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    batch_size: int = Field(8, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    # batch_size x gradient_accumulation is the global batch; on several processes each
    # takes a share (posttrain.distributed). A memory cap, not part of the stage's identity.
    max_device_batch: int | None = Field(None, gt=0, description="most examples per device per forward (memory)")
    max_length: int = Field(512, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    scheduler: Literal[SCHEDULERS] = "linear"  # type: ignore[valid-type]
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: Seed | None = Field(None, description="default: the recipe's seed for this run")
    lora: LoraSpec | Literal[False] | None = Field(
        None, description="None: the model's LoRA setting; false: full fine-tuning")
    logging_steps: int = Field(10, gt=0)
    # None: on when the memory estimate on a GPU needs it, never on CPU (posttrain.defaults).
    gradient_checkpointing: bool | None = Field(None, description="recompute activations in the backward (less "
                                                                  "memory); default: when a GPU needs it")
    use_liger_kernel: bool = Field(False, description="Liger's fused kernels (needs liger-kernel; GPU)")
    warmup_steps: int | None = Field(None, ge=0, description="warmup in optimizer steps (instead of warmup_ratio)")
    optim: Literal[OPTIMIZERS] = "adamw_torch"  # type: ignore[valid-type]
    dataset_num_proc: int | None = Field(None, gt=0, description="processes for TRL's tokenization")
    eval_data: Text | None = Field(None, description="a dataset of the recipe: its loss is measured during training")
    eval_steps: int | None = Field(None, gt=0, description="with eval_data: every N optimizer steps (default: at the end)")
    trainer: dict[Text, Any] = Field({}, description="other fields of the method's TRL config, checked before training")
    resources: ResourcesSpec | None = Field(None, description="this stage's cluster job (over the recipe's "
                                                              "resources); in no key")

    # A method's settings added after its stage keys were first published: left out of
    # the key while at their default, so that adding a setting keeps every cached stage
    # (and every result) trained before it existed.
    KEY_OMITS_DEFAULT: ClassVar[tuple[str, ...]] = ()

    # Settings every method gained later: out of the key while at their default (see above).
    COMMON_OMITS_DEFAULT: ClassVar[tuple[str, ...]] = (
        "gradient_checkpointing", "warmup_steps", "optim", "eval_data", "eval_steps", "trainer", "use_liger_kernel")

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_steps is not None and self.warmup_ratio > 0:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        if self.eval_steps is not None and self.eval_data is None:
            raise ValueError("eval_steps needs eval_data (the dataset whose loss is measured)")
        return self

    def key_settings(self) -> dict:
        """The settings a stage's key hashes: all but LoRA (hashed resolved, apart), logging,
        how many processes tokenize, the per-device cap and the cluster job's resources
        (none changes what is trained:
        the global batch is batch_size x gradient_accumulation on any world size)."""
        dumped = self.model_dump(mode="json", exclude={"lora", "logging_steps", "dataset_num_proc",
                                                       "max_device_batch", "resources"})
        for name in self.COMMON_OMITS_DEFAULT + self.KEY_OMITS_DEFAULT:
            if getattr(self, name) == type(self).model_fields[name].default:
                del dumped[name]
        if self.gradient_checkpointing is False:   # off, as before `None` (automatic) was its default
            del dumped["gradient_checkpointing"]
        return dumped

    @field_validator("lora", mode="wrap")
    @classmethod
    def _lora(cls, value: Any, handler) -> Any:
        """Errors under the key the user wrote (`stages.sft.lora.r`), not once per union
        member (`lora.LoraSpec.r` beside `lora.literal[False]`)."""
        if isinstance(value, dict):
            return LoraSpec.model_validate(value)
        if value is None or value is False or isinstance(value, LoraSpec):
            return handler(value)
        raise ValueError("must be a mapping of LoRA settings ({r: 16, alpha: 32, target_modules: all-linear}), "
                         "false (full fine-tuning) or null (the model's setting)")



# pydantic error types -> the message a recipe author reads (the place is added by the caller).
MESSAGES = {
    "greater_than": lambda e: f"must be > {e['ctx']['gt']}",
    "greater_than_equal": lambda e: f"must be >= {e['ctx']['ge']}",
    "less_than": lambda e: f"must be < {e['ctx']['lt']}",
    "less_than_equal": lambda e: f"must be <= {e['ctx']['le']}",
    "finite_number": lambda e: "must be a finite number (not .inf or .nan)",
    "extra_forbidden": lambda e: "unknown key",
    "missing": lambda e: "required",
    "literal_error": lambda e: f"must be one of {e['ctx']['expected']}",
    "union_tag_invalid": lambda e: f"unknown method {e['ctx']['tag']!r} (use {e['ctx']['expected_tags']})",
    "value_error": lambda e: str(e["ctx"]["error"]),
    "too_short": lambda e: "must not be empty",
    "string_too_short": lambda e: "must not be empty",
}


def error_message(err: dict) -> str:
    """One pydantic error (an item of ValidationError.errors()) as a message."""
    return MESSAGES.get(err["type"], lambda e: e["msg"])(err)
