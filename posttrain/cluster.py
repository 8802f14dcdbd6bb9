"""What a recipe is on a cluster, known without data or submitit: the stage graph (each
distinct chain prefix and seed, one job each) and every job's resources (the recipe's
`resources:` defaults, a stage's own, posttrain's). `posttrain validate` checks them
here, and `run --executor slurm` (posttrain.executors) submits them."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.recipe.fields import time_minutes
from posttrain.recipe.schema import Recipe

STAGE_DEFAULTS = {"gpus": 1, "time": 240}       # a stage job: one GPU, 4 hours, unless the recipe says
PREPARE_DEFAULTS = {"gpus": 0, "time": 60}      # data preparation needs no GPU
EVALUATE_DEFAULTS = {"gpus": 1, "time": 240}


@dataclass(frozen=True)
class StageJobSpec:
    """One node of the stage graph, known without data: a chain prefix and a run seed."""

    prefix: tuple[str, ...]
    seed: int

    @property
    def stage(self) -> str:
        return self.prefix[-1]

    @property
    def label(self) -> str:
        return f"{'-'.join(self.prefix)}-s{self.seed}"


def stage_graph(recipe: Recipe) -> list[tuple[StageJobSpec, StageJobSpec | None]]:
    """The stage nodes `plan.make_plan` builds, in its order (parents first), with each
    one's parent, from the recipe alone. Two nodes are one when every stage of their
    prefix pins its own `seed` (their keys are then equal): trained once."""
    nodes: dict[tuple, tuple[StageJobSpec, StageJobSpec | None]] = {}
    for chain in recipe.pipelines.values():
        for seed in recipe.seeds:
            parent = None
            for depth in range(1, len(chain) + 1):
                prefix = tuple(chain[:depth])
                seeds = tuple(recipe.stages[name].seed if recipe.stages[name].seed is not None else seed
                              for name in prefix)
                node = nodes.setdefault((prefix, seeds), (StageJobSpec(prefix, seed), parent))[0]
                parent = node
    return list(nodes.values())


def job_resources(recipe: Recipe, job: str, stage: str | None = None) -> dict:
    """A job's resources: the recipe's `resources:` defaults, overridden key by key by the
    stage's own (or by `resources.prepare` / `resources.evaluate`), then posttrain's defaults."""
    top = recipe.resources
    layers = [{"stage": STAGE_DEFAULTS, "prepare": PREPARE_DEFAULTS, "evaluate": EVALUATE_DEFAULTS}[job],
              top.model_dump(exclude={"prepare", "evaluate"}, exclude_none=True)]
    if job == "prepare":
        layers[1].pop("gpus", None)   # the recipe's GPU count is for training, not for preparing data
    own = (recipe.stages[stage].resources if job == "stage" else getattr(top, job))
    if own is not None:
        layers.append(own.model_dump(exclude_none=True))
    merged: dict = {}
    for layer in layers:
        merged.update(layer)
    return merged


def stage_device(recipe: Recipe) -> str:
    """Where the stage jobs train: cuda when they ask for GPUs, else cpu."""
    return "cuda" if any(job_resources(recipe, "stage", name)["gpus"] for name in recipe.stages) else "cpu"


def resource_problems(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Each stage whose global batch its job's processes (gpus x nodes) cannot share evenly;
    `model.dtype: auto` with stages on GPU and on CPU (it would resolve two ways)."""
    from posttrain.distributed import batch_problem

    problems = []
    on_gpu = {name: bool(job_resources(recipe, "stage", name)["gpus"]) for name in recipe.stages}
    if recipe.model.dtype == "auto" and len(set(on_gpu.values())) > 1:
        problems.append((("model", "dtype"), "auto resolves to bfloat16 on a GPU and float32 on CPU, and these "
                         f"stages run on CPU (resources gpus 0): {', '.join(n for n, g in on_gpu.items() if not g)}; "
                         "name the dtype, or give every stage GPUs"))
    for name, spec in recipe.stages.items():
        resources = job_resources(recipe, "stage", name)
        world = max(resources["gpus"], 1) * resources.get("nodes", 1)
        message = batch_problem(spec.batch_size, spec.gradient_accumulation, world)
        if message:
            where = ("stages", name, "resources") if spec.resources is not None else ("resources",)
            problems.append((where, f"stage {name} runs on {world} processes (gpus x nodes): {message}"))
    return problems


def cluster_jobs(recipe: Recipe) -> list[str]:
    """`run --executor slurm --dry-run`: the jobs a submission would make, in submission
    order, each with its dependencies and resources (its world size is gpus x nodes)."""
    lines = [f"{'job':<24} {'after':<28} {'gpus x nodes':<13} {'time':<11} partition"]

    def line(label, after, resources, per_gpu_tasks=True):
        gpus = resources["gpus"] if per_gpu_tasks else min(resources["gpus"], 1)
        nodes = resources.get("nodes", 1) if per_gpu_tasks else 1
        minutes = f"{time_minutes(resources['time'])} min"
        lines.append(f"{label:<24} {', '.join(after) or '-':<28} {f'{gpus} x {nodes}':<13} "
                     f"{minutes:<11} {resources.get('partition') or '(default)'}")

    line("prepare", [], job_resources(recipe, "prepare"), per_gpu_tasks=False)
    labels = []
    for node, parent in stage_graph(recipe):
        line(node.label, ["prepare"] + ([parent.label] if parent else []), job_resources(recipe, "stage", node.stage))
        labels.append(node.label)
    line("evaluate", ["prepare", *labels] if len(labels) < 3 else ["prepare", f"{len(labels)} stage jobs"],
         job_resources(recipe, "evaluate"), per_gpu_tasks=False)
    return lines
