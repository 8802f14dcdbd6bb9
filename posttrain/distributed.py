"""How a stage's global batch is laid out over the processes that train it.

A recipe's `batch_size x gradient_accumulation` is the GLOBAL batch: the examples behind
one optimizer step, what it means in one process. On W processes (torchrun, accelerate
launch; `plan --world-size W` for a machine you are not on) each process takes a
per-device batch and accumulates, so that per-device batch x accumulation x W is that
same global batch: the same optimisation (global batch, steps, schedule) on 1 CPU or
8 GPUs. The per-device batch is the largest divisor of global / W that is at most
`batch_size` (and at most the stage's `max_device_batch`, a memory cap); accumulation
makes up the rest. A global batch W does not divide is refused, naming the nearest
valid settings.

Imports nothing heavy: `posttrain validate` checks the division.
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import asdict, dataclass

from posttrain.errors import PosttrainError


@dataclass(frozen=True)
class BatchLayout:
    """One stage's global batch on `world_size` processes."""

    world_size: int
    per_device_batch: int
    gradient_accumulation: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.per_device_batch * self.gradient_accumulation

    @property
    def strategy(self) -> str:
        """How the processes share the work: one process, or data-parallel replicas
        (sharding presets are a later item)."""
        return "single" if self.world_size == 1 else "ddp"

    def as_dict(self) -> dict:
        return {**asdict(self), "global_batch": self.global_batch, "strategy": self.strategy}


def world_size() -> int:
    """The processes training together: torch.distributed's when a launcher started it,
    else the launcher's WORLD_SIZE (torchrun and accelerate set it), else 1. Imports no
    torch: when torch is not loaded yet, no process group exists either."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    value = os.environ.get("WORLD_SIZE", "").strip()
    if not value:
        return 1
    if not value.isdigit() or int(value) < 1:
        raise PosttrainError(f"WORLD_SIZE={value!r}: not a positive whole number (set by the launcher)")
    return int(value)


def batch_layout(batch_size: int, gradient_accumulation: int, world: int,
                 max_device_batch: int | None = None) -> BatchLayout:
    """The layout of `batch_size x gradient_accumulation` on `world` processes
    (ValueError with `batch_problem`'s message when `world` does not divide it)."""
    problem = batch_problem(batch_size, gradient_accumulation, world)
    if problem:
        raise ValueError(problem)
    per_process = batch_size * gradient_accumulation // world
    cap = min(batch_size, max_device_batch or batch_size)
    per_device = max(d for d in range(1, min(cap, per_process) + 1) if per_process % d == 0)
    return BatchLayout(world, per_device, per_process // per_device)


def batch_problem(batch_size: int, gradient_accumulation: int, world: int) -> str | None:
    """Why `world` processes cannot share the global batch evenly, with the nearest
    settings that they can (same accumulation, or same batch_size), or None."""
    total = batch_size * gradient_accumulation
    if total % world == 0:
        return None
    sizes = nearest(batch_size, lambda b: b * gradient_accumulation % world == 0)
    accumulations = nearest(gradient_accumulation, lambda a: batch_size * a % world == 0)
    what = "GPUs" if _on_gpu() else "processes"
    return (f"batch_size {batch_size} x gradient_accumulation {gradient_accumulation} = {total} is not "
            f"divisible by {world} {what} (the global batch is split evenly over them); use batch_size "
            + " or ".join(map(str, sizes)) + ", or gradient_accumulation " + " or ".join(map(str, accumulations)))


def nearest(value: int, valid) -> list[int]:
    """The closest positive integers below and above `value` for which `valid` holds
    (valid(value) is False; some multiple of value is always valid)."""
    below = next((v for v in range(value - 1, 0, -1) if valid(v)), None)
    above = next(v for v in itertools.count(value + 1) if valid(v))
    return [v for v in (below, above) if v is not None]


def _on_gpu() -> bool:
    """Whether a CUDA GPU is visible, asked of torch only when it is loaded already."""
    if "torch" not in sys.modules:
        return False
    import torch

    return torch.cuda.is_available()


def stage_layout(name: str, spec, world: int | None = None) -> BatchLayout:
    """Stage `name`'s layout on `world` processes (None: this run's `world_size()`); a
    global batch they cannot share is a RecipeError under the stage's batch_size."""
    from posttrain.errors import RecipeError

    world = world_size() if world is None else world
    try:
        return batch_layout(spec.batch_size, spec.gradient_accumulation, world, spec.max_device_batch)
    except ValueError as exc:
        raise RecipeError(f"stages.{name}.batch_size: {exc}") from None


# ---------------------------------------------------------------- sharding strategies
#
# `distributed.strategy` in a recipe says how the processes share the model:
#   ddp     every process holds the whole model, gradients are averaged (DistributedDataParallel)
#   fsdp2   parameters, gradients and optimizer states sharded over the processes (PyTorch FSDP2)
#   zero2   DeepSpeed ZeRO stage 2: gradients and optimizer states sharded (the `deepspeed` extra)
#   zero3   DeepSpeed ZeRO stage 3: parameters too (the `deepspeed` extra)
#   auto    (the default) decided at run time by the rule in `choose_strategy`.
# One process is always "single", whatever the recipe says. The strategy is in no stage
# key: it changes how the work is laid out, not what is computed (float noise aside).
# It takes effect through the TrainingArguments fields (`fsdp`, `fsdp_config`,
# `deepspeed`: `strategy_trainer_kwargs`), which work under torchrun as well as under
# accelerate launch; `accelerate_config` writes the same choice as an accelerate config
# file (from the files TRL ships) for `accelerate launch --config_file`.

STRATEGIES = ("auto", "ddp", "fsdp2", "zero2", "zero3")
DEEPSPEED_STRATEGIES = ("zero2", "zero3")
SHARDED_STRATEGIES = ("fsdp2", "zero3")          # parameters sharded: one GPU holds a 1/world slice
# Training state per parameter of a full fine-tune in mixed precision: 16-bit weights (2)
# and gradients (2), fp32 master weights (4), AdamW's two fp32 moments (8).
STATE_BYTES_PER_PARAM = 16
# The share of one GPU's memory the training state may take under ddp; the rest is for
# activations, the CUDA context and fragmentation.
FIT_FRACTION = 0.8
DEEPSPEED_INSTALL = "pip install 'posttrain[deepspeed]' (DeepSpeed builds from source: it needs a CUDA toolkit)"
# The accelerate config file TRL ships for each strategy (trl/accelerate_configs/).
TRL_ACCELERATE_CONFIGS = {"single": "single_gpu.yaml", "ddp": "multi_gpu.yaml", "fsdp2": "fsdp2.yaml",
                          "zero2": "zero2.yaml", "zero3": "zero3.yaml"}


@dataclass(frozen=True)
class ModelSize:
    """A model's size, counted on the meta device (no weights): all parameters, the ones
    that train (all of them, or LoRA's adapter), and its shape for activation estimates."""

    params: int
    trainable: int
    hidden: int = 0
    layers: int = 0

    @property
    def lora(self) -> bool:
        return self.trainable < self.params


def training_state_bytes(size: ModelSize, weight_bytes: int = 2) -> int:
    """Bytes of weights, gradients and optimizer states a stage holds (before sharding):
    a full fine-tune STATE_BYTES_PER_PARAM per parameter; with LoRA the frozen weights at
    `weight_bytes` each plus STATE_BYTES_PER_PARAM per trainable parameter."""
    if not size.lora:
        return STATE_BYTES_PER_PARAM * size.params
    return weight_bytes * (size.params - size.trainable) + STATE_BYTES_PER_PARAM * size.trainable


def choose_strategy(requested: str, size: ModelSize | None, world: int, gpu_memory_gb: float | None,
                    weight_bytes: int = 2) -> tuple[str, str]:
    """(strategy, why). The rule of `auto`:
    - one process: single;
    - no GPU (CPU processes, gloo): ddp;
    - the training state (`training_state_bytes`) fits in FIT_FRACTION of one GPU's memory: ddp
      (each GPU holds it whole, nothing is gathered: fastest);
    - else fsdp2 (the state is sharded over the world).
    A strategy the recipe names is used as it is (one process: single)."""
    if world == 1:
        return "single", "one process"
    if requested != "auto":
        return requested, "distributed.strategy in the recipe"
    if not gpu_memory_gb:
        return "ddp", "auto: no GPU memory known (CPU processes, or a plan without --gpu-memory)"
    if size is None:
        return "ddp", "auto: the model's size could not be counted"
    need = training_state_bytes(size, weight_bytes)
    budget = FIT_FRACTION * gpu_memory_gb * 1e9
    verdict = "fits in" if need <= budget else "exceeds"
    return ("ddp" if need <= budget else "fsdp2",
            f"auto: weights+grads+optimizer {need / 1e9:.1f} GB {verdict} {FIT_FRACTION:.0%} of {gpu_memory_gb:g} GB")


def launcher_strategy(environ=None) -> str | None:
    """The sharding the launcher's accelerate config named (accelerate launch exports it
    to the processes), or None (torchrun, a multi-GPU or single config: no sharding named)."""
    environ = os.environ if environ is None else environ
    if environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "fsdp2" if environ.get("FSDP_VERSION", "1") == "2" else "fsdp1"
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return f"zero{environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?')}"
    return None


def launcher_precision_problem(environ=None) -> str | None:
    """Why the launcher's mixed precision would change a stage's numerics, or None: the
    TrainingArguments of a float32 stage (bf16=False) take ACCELERATE_MIXED_PRECISION."""
    environ = os.environ if environ is None else environ
    value = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if value in ("no", ""):
        return None
    return (f"the launcher's accelerate config sets mixed_precision {value}, which transformers applies to "
            "every stage that does not train in bf16 itself (a float32 stage would train in autocast); set "
            "mixed_precision: 'no' in it (posttrain sets each stage's precision from model.dtype)")


def launcher_problem(requested: str, launched: str | None) -> str | None:
    """Why the recipe's strategy and the launcher's accelerate config disagree, or None.
    `auto` follows the launcher's config; a named strategy must be the one it names."""
    if launched is None or requested in ("auto", launched):
        return None
    return (f"the recipe asks for {requested} but the launcher's accelerate config runs {launched}; "
            f"set distributed.strategy: {launched if launched in STRATEGIES else 'auto'} (or auto, which follows "
            f"the launcher), or launch with a config for {requested} (posttrain.distributed.accelerate_config)")


def strategy_trainer_kwargs(strategy: str, gradient_checkpointing: bool = False) -> dict:
    """The TrainingArguments fields that put `strategy` into effect under any launcher:
    FSDP2 through `fsdp`/`fsdp_config` (TRL's fsdp2.yaml, keys unprefixed), ZeRO through a
    DeepSpeed config dict (`deepspeed_config`); nothing for single/ddp or a strategy the
    launcher already set up (`launched`)."""
    if strategy == "fsdp2":
        return {"fsdp": True, "fsdp_config": fsdp2_config(gradient_checkpointing)}
    if strategy in DEEPSPEED_STRATEGIES:
        return {"deepspeed": deepspeed_config(strategy)}
    return {}


def trl_accelerate_config(strategy: str) -> dict:
    """The accelerate config file TRL ships for `strategy`, as a dict."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("trl")
    folder = os.path.join(os.path.dirname(spec.origin), "accelerate_configs")
    with open(os.path.join(folder, TRL_ACCELERATE_CONFIGS[strategy]), encoding="utf-8") as file:
        return yaml.safe_load(file)


def fsdp2_config(gradient_checkpointing: bool = False) -> dict:
    """TrainingArguments.fsdp_config for FSDP2: TRL's fsdp2.yaml `fsdp_config` (its `fsdp_`
    prefixes dropped, as transformers does) with our explicit values: activation
    checkpointing as resolved (FSDP's own, which avoids the redundant all-gather of the
    TrainingArguments flag); no cpu_ram_efficient_loading (posttrain hands the trainer a
    model every rank built, not a checkpoint path to load on rank 0)."""
    shipped = trl_accelerate_config("fsdp2")["fsdp_config"]
    config = {key.removeprefix("fsdp_"): value for key, value in shipped.items()}
    config["cpu_offload"] = config.pop("offload_params")
    config.update(activation_checkpointing=gradient_checkpointing, cpu_ram_efficient_loading=False)
    return config


def deepspeed_config(strategy: str) -> dict:
    """A DeepSpeed config dict for TrainingArguments.deepspeed: accelerate's DeepSpeedPlugin
    built from TRL's zero2/zero3.yaml `deepspeed_config`, with batch sizes, accumulation,
    clipping and precision left "auto" (transformers fills them from the TrainingArguments,
    so the global batch stays posttrain's)."""
    from accelerate.utils import DeepSpeedPlugin

    shipped = trl_accelerate_config(strategy)["deepspeed_config"]
    plugin = DeepSpeedPlugin(
        zero_stage=shipped["zero_stage"], offload_optimizer_device=shipped["offload_optimizer_device"],
        offload_param_device=shipped["offload_param_device"], zero3_init_flag=shipped["zero3_init_flag"],
        zero3_save_16bit_model=shipped.get("zero3_save_16bit_model", False))
    config = dict(plugin.deepspeed_config)
    config.update(gradient_accumulation_steps="auto", steps_per_print=2**31 - 1,   # Infinity is not JSON
                  bf16={"enabled": "auto"}, fp16={"enabled": "auto"})
    return config


def accelerate_config(strategy: str, num_processes: int, mixed_precision: str = "no",
                      use_cpu: bool = False) -> dict:
    """An accelerate config for `accelerate launch --config_file` (what `posttrain run
    --gpus N` passes): the file TRL ships for `strategy` (auto: multi_gpu.yaml, each
    stage's strategy then set through its TrainingArguments) with our explicit values: the
    number of processes, CPU, no rank-0-only loading under FSDP2, and mixed precision
    "no": transformers takes the launcher's ACCELERATE_MIXED_PRECISION for any stage whose
    `bf16` is False, so TRL's "bf16" would train a float32 stage in bf16 autocast; each
    stage's precision comes from its model.dtype (TrainingArguments.bf16)."""
    strategy = "ddp" if strategy == "auto" else strategy
    config = trl_accelerate_config("single" if num_processes == 1 else strategy)
    config.update(num_processes=num_processes, mixed_precision=mixed_precision, use_cpu=use_cpu)
    if strategy == "fsdp2" and "fsdp_config" in config:
        config["fsdp_config"] = {**config["fsdp_config"], "fsdp_cpu_ram_efficient_loading": False}
    return config


def config_strategy(config: dict) -> str:
    """The strategy an accelerate config file names (its distributed_type, FSDP version,
    ZeRO stage): single, ddp, fsdp1, fsdp2 or zeroN."""
    kind = str(config.get("distributed_type", "NO")).upper()
    if kind == "FSDP":
        return "fsdp2" if str((config.get("fsdp_config") or {}).get("fsdp_version", 1)) == "2" else "fsdp1"
    if kind == "DEEPSPEED":
        return f"zero{(config.get('deepspeed_config') or {}).get('zero_stage', '?')}"
    return "single" if kind == "NO" or config.get("num_processes", 2) == 1 else "ddp"


def read_accelerate_config(path) -> dict:
    """An accelerate config file (YAML or JSON) as a dict; ValueError saying why not."""
    import yaml

    try:
        with open(path, encoding="utf-8") as file:
            config = yaml.safe_load(file)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not an accelerate config (a mapping of settings)")
    return config


def launch_config(recipe, base_dir, num_processes: int, use_cpu: bool = False) -> dict:
    """The accelerate config `posttrain run --gpus N` launches with (write it as YAML and
    pass it as --config_file): the recipe's `distributed.accelerate_config` file with N
    processes, else `accelerate_config` for the recipe's strategy."""
    path = recipe.distributed.config_file(base_dir)
    if path is None:
        return accelerate_config(recipe.distributed.strategy, num_processes, use_cpu=use_cpu)
    return {**read_accelerate_config(path), "num_processes": num_processes}
