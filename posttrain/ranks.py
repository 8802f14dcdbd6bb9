"""Who does what when a launcher starts several processes (`torchrun`, `accelerate launch`,
`posttrain run --gpus N`, a SLURM task per GPU).

Every process runs the same `posttrain run`. Rank 0 alone plans what to train, writes the
run directory, the report and W&B, holds the stage cache's locks and publishes into it;
every rank trains; the others write nothing shared. Rank 0 decides and the others follow
its decision (`broadcast`), so no two processes can see the cache differently (another
run may publish a stage between two looks). Evaluation runs once, on rank 0, after
training: the other ranks are done by then.

The process group is accelerate's (`PartialState`, as transformers' Trainer would start it
later): NCCL on GPUs, gloo on CPU; it starts only when a launcher set WORLD_SIZE > 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from datetime import timedelta

from posttrain.distributed import world_size
from posttrain.errors import PosttrainError

# Followers wait in a collective while rank 0 prepares data (curation may score every row
# with a model) and while it publishes a stage: longer than torch's default 10-30 minutes.
WAIT = timedelta(hours=2)


class LeaderFailed(PosttrainError):
    """Rank 0 stopped (its own message says why); this rank stops with it."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, value):
        """Rank 0's `value` on every rank (any picklable object)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def leader_first(self, work):
        """`work()` on rank 0 first (it fills the caches the others then read), then on
        the others; when rank 0 fails, the others raise LeaderFailed instead of waiting."""
        result = self._from_leader(work, share=False)
        return result if self.is_main or self.world == 1 else work()

    def decide(self, decision):
        """Rank 0's decision (`decision()`, called on rank 0 only) on every rank; when it
        raises on rank 0, the others raise LeaderFailed."""
        return self._from_leader(decision, share=True)

    def _from_leader(self, work, share: bool):
        if self.world == 1:
            return work()
        if self.is_main:
            try:
                value = work()
            except BaseException as exc:
                self.broadcast(("failed", type(exc).__name__))
                raise
            self.broadcast(("ok", value if share else None))
            return value
        status, value = self.broadcast(None)
        if status != "ok":
            raise LeaderFailed(f"{self}: stopped, rank 0 failed ({value}; its message says why)")
        return value


def this_process() -> Ranks:
    """This process's rank, starting the process group when a launcher asked for several
    processes (WORLD_SIZE > 1); one process otherwise, with no torch import."""
    if world_size() == 1:
        return Ranks()
    import torch
    from accelerate import PartialState

    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "RANK") if not os.environ.get(name)]
    if missing:
        raise PosttrainError(f"WORLD_SIZE={world_size()} but {', '.join(missing)} unset: start the processes with a "
                             "launcher (torchrun, accelerate launch, posttrain run --gpus N), or unset WORLD_SIZE "
                             "to run one process")
    # cpu=True where the trainer will say use_cpu (no GPU): gloo; else the GPUs' backend.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT)
    return Ranks(state.process_index, state.num_processes, state.local_process_index)


def launcher_rank() -> int:
    """The launcher's RANK for this process (0 without a launcher), read without torch:
    what the CLI uses to print a dry run or an error once, not N times."""
    value = os.environ.get("RANK", "0").strip()
    return int(value) if value.isdigit() else 0


def visible_gpus() -> int:
    """CUDA GPUs this process can use (torch's count, which honours CUDA_VISIBLE_DEVICES)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_command(gpus: int, argv: list[str], config_file: str) -> list[str]:
    """accelerate's launcher running the `posttrain` command `argv` (this one, without --gpus)
    in `gpus` processes, one per GPU of this machine, with the accelerate config of the
    recipe's strategy (`distributed.launch_config`: mixed precision "no", each stage's
    precision is its own). The settings the launcher would otherwise guess, and warn about,
    are given."""
    import sys

    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
            "--num_processes", str(gpus), "--num_machines", "1", "--dynamo_backend", "no",
            "-m", "posttrain", *argv]


def relaunch_on_gpus(gpus: int, argv: list[str], config: dict, log) -> int:
    """Run this command again under accelerate's launcher on `gpus` GPUs with the accelerate
    `config`; its exit code. Refused (exit 2) under a launcher already, or when the GPUs
    are not there."""
    import shlex
    import subprocess
    import tempfile

    import yaml

    from posttrain.artifacts import Area

    if world_size() > 1:
        raise PosttrainError(f"--gpus {gpus}: this process was started by a launcher already "
                             f"(WORLD_SIZE={world_size()}); drop --gpus, the launcher sets the processes")
    have = visible_gpus()
    if have < gpus:
        raise PosttrainError(
            f"--gpus {gpus}: this machine has {have} CUDA GPU(s) visible"
            + (f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})" if "CUDA_VISIBLE_DEVICES" in os.environ
               else "") + "; several processes on CPU: torchrun --nproc_per_node N -m posttrain run ...")
    with tempfile.TemporaryDirectory(prefix="posttrain-launch-") as folder:
        config_file = Area(folder).write_text(Path(folder) / "accelerate.yaml", yaml.safe_dump(config))
        command = launch_command(gpus, argv, str(config_file))
        log("launching: " + shlex.join(command))
        log("accelerate config: " + ", ".join(f"{k}={v}" for k, v in config.items() if not isinstance(v, dict)))
        return subprocess.run(command, check=False).returncode
