"""GPU defaults, resolved in one place: how a stage trains on the machine it runs on.

`resolve_stage` takes a stage's settings and the machine's facts (`Machine`: device,
GPU count and memory, bf16 support, which optional kernels are installed) and returns
every setting a GPU changes, with a recipe setting always winning:

- precision: `model.dtype` resolved by `models.resolve_precision` (auto: bf16 on a GPU
  that has it). Changes the numerics: in the stage key (plan.key_precision).
- strategy: `distributed.choose_strategy` (the `auto` rule), or the launcher's accelerate
  config when the recipe says auto. Not in the key: the same computation laid out
  differently (float noise aside).
- attention: the recipe's `model.attn_implementation`; else on a GPU FlashAttention-2 when
  `flash_attn` is importable, else SDPA; on CPU transformers' own choice, as before. Not in
  the key: every one of them computes exact attention (they differ by float noise).
- gradient checkpointing: the stage's setting; unset, on when the memory estimate
  (`memory_estimate`) exceeds FIT_FRACTION of one GPU, never on CPU. Not in the key: the
  backward recomputes the same activations.
- Liger kernels: only when the stage asks (`use_liger_kernel`; refused when not installed).
  In the key when asked (its fused kernels round differently).
- data loaders: pinned memory on a GPU (faster host-to-device copies), none on CPU; no
  worker processes (rows are tokenized in memory; collating is cheap). Pure speed: not in
  the key.
- SFT padding_free / packing: the recipe's, never switched on here. Packing changes how
  many conversations a step trains (a different optimisation); padding-free is the same
  training only where the attention kernel separates the flattened sequences (TRL
  documents FlashAttention for it), so it stays the user's decision.

On CPU every value is what posttrain passed before these defaults existed: CPU stage
keys and results do not move (tests/test_gpu_defaults.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from posttrain.distributed import FIT_FRACTION, SHARDED_STRATEGIES, ModelSize, choose_strategy, launcher_strategy

# Activation bytes per token, per hidden unit, per layer, in 16-bit, without the attention
# scores (SDPA and FlashAttention never hold them): 34 (Korthikanti et al. 2022, table 2).
ACTIVATION_BYTES = 34
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Machine:
    """What the defaults depend on: the device and its GPUs, and which optional packages exist."""

    device: str                        # "cuda" or "cpu"
    gpus: int = 0
    gpu_memory_gb: float | None = None # one GPU's memory
    gpu_name: str | None = None
    bf16: bool = False                 # the GPU computes in bfloat16
    flash_attn: bool = False           # flash_attn importable
    liger: bool = False                # liger_kernel importable
    deepspeed: bool = False            # deepspeed importable

    def as_dict(self) -> dict:
        return asdict(self)


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def machine(device: str | None = None, gpu_memory_gb: float | None = None) -> Machine:
    """This machine's facts, or those of a machine planned for (`plan --device cuda
    --gpu-memory 80`: a GPU with that memory and bf16, whatever this machine has)."""
    import torch

    libraries = dict(flash_attn=installed("flash_attn"), liger=installed("liger_kernel"),
                     deepspeed=installed("deepspeed"))
    here = torch.cuda.is_available()
    if gpu_memory_gb is not None and device is None:
        device = "cuda"
    if device == "cpu" or (device is None and not here):
        return Machine("cpu", **libraries)
    if not here:   # planning for a GPU machine from elsewhere
        return Machine("cuda", gpus=0, gpu_memory_gb=gpu_memory_gb, bf16=True, **libraries)
    props = torch.cuda.get_device_properties(0)
    return Machine("cuda", gpus=torch.cuda.device_count(), gpu_memory_gb=gpu_memory_gb or props.total_memory / 1e9,
                   gpu_name=props.name, bf16=torch.cuda.is_bf16_supported(), **libraries)


def memory_estimate(size: ModelSize, strategy: str, world: int, per_device_batch: int, max_length: int,
                    sequences: int = 1, weight_bytes: int = 2) -> float:
    """Bytes one device holds while training: the training state (distributed.
    training_state_bytes), divided by the world when sharded (fsdp2, zero3; zero2 shards
    all but the 16-bit weights), plus activations without checkpointing:
    ACTIVATION_BYTES x tokens in flight (batch x max_length x sequences per example) x
    hidden x layers."""
    from posttrain.distributed import training_state_bytes

    state = training_state_bytes(size, weight_bytes)
    if strategy in SHARDED_STRATEGIES:
        state /= world
    elif strategy == "zero2":
        weights = weight_bytes * size.params
        state = weights + (state - weights) / world
    activations = ACTIVATION_BYTES * per_device_batch * max_length * sequences * size.hidden * size.layers
    return state + activations


def resolve_stage(spec, lora, model, requested_strategy: str, layout, facts: Machine, size: ModelSize | None,
                  sequences: int = 1, launched: str | None = None) -> dict:
    """The resolved settings of one stage (see the module's docstring), as recorded in
    stage.json `resolved`, shown by `plan` and passed to the TRL config. `model`: the
    recipe's model spec; `layout`: the stage's BatchLayout; `size`: the model's size (None:
    not needed, on CPU)."""
    from posttrain.models import resolve_precision

    precision = resolve_precision(model.dtype, facts.device, facts.bf16 if facts.device == "cuda" else None)
    weight_bytes = DTYPE_BYTES[precision.dtype]
    world = layout.world_size
    # The launcher's accelerate config (its environment), else the recipe's own file, which
    # `run --gpus N` launches with: `auto` follows the one the processes will run under.
    from_launcher = launcher_strategy() if world > 1 else None
    if from_launcher and requested_strategy == "auto":
        strategy, why = from_launcher, "auto: the launcher's accelerate config"
    elif launched and world > 1 and requested_strategy == "auto":
        strategy, why = launched, "auto: the recipe's distributed.accelerate_config"
    else:
        strategy, why = choose_strategy(requested_strategy, size, world,
                                        facts.gpu_memory_gb if facts.device == "cuda" else None, weight_bytes)
    on_gpu = facts.device == "cuda"
    attention = model.attn_implementation or (("flash_attention_2" if facts.flash_attn else "sdpa") if on_gpu else None)
    memory = (memory_estimate(size, strategy, world, layout.per_device_batch, spec.max_length, sequences, weight_bytes)
              if on_gpu and size is not None else None)
    checkpointing, checkpointing_why = spec.gradient_checkpointing, "the stage's gradient_checkpointing"
    if checkpointing is None:
        checkpointing, checkpointing_why = gradient_checkpointing(memory, facts, lora, strategy)
    return {
        "strategy": strategy, "strategy_why": why,
        "precision": precision.dtype, "bf16": precision.bf16, "device": facts.device,
        "attn_implementation": attention,
        "gradient_checkpointing": checkpointing, "gradient_checkpointing_why": checkpointing_why,
        "memory_gb": round(memory / 1e9, 2) if memory is not None else None,
        "use_liger_kernel": spec.use_liger_kernel,
        "dataloader_pin_memory": on_gpu,
        "dataloader_num_workers": 0,
    }


def gradient_checkpointing(memory: float | None, facts: Machine, lora, strategy: str) -> tuple[bool, str]:
    """(on, why) for a stage that does not say: on when the estimate exceeds FIT_FRACTION of
    one GPU; never on CPU (5-16x slower there, and small models do not need it); never
    with LoRA under zero3 (posttrain's non-reentrant checkpointing crashes there)."""
    if facts.device != "cuda":
        return False, "off on CPU"
    if memory is None or not facts.gpu_memory_gb:
        return False, "off: no memory estimate (GPU memory or the model's size unknown)"
    budget = FIT_FRACTION * facts.gpu_memory_gb * 1e9
    if memory <= budget:
        return False, f"estimate {memory / 1e9:.1f} GB fits in {FIT_FRACTION:.0%} of {facts.gpu_memory_gb:g} GB"
    if lora is not None and strategy == "zero3":
        return False, "LoRA under zero3: non-reentrant checkpointing crashes there"
    return True, f"estimate {memory / 1e9:.1f} GB exceeds {FIT_FRACTION:.0%} of {facts.gpu_memory_gb:g} GB"
