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
