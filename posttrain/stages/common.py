"""What every stage shares: the context it runs in, explicit trainer settings, cost."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from posttrain.artifacts import TRAINER_LOG, Area
from posttrain.distributed import BatchLayout, stage_layout
from posttrain.models import ModelSource, load_model, lora_config, resolve_precision
from posttrain.stages.divergence import divergence_guard, refuse_nonfinite_weights


@dataclass
class StageContext:
    name: str                 # stage name in the recipe
    spec: Any                 # the method's settings (posttrain.stages.METHODS[...].settings)
    seed: int
    start: ModelSource        # the model this stage starts from
    examples: list[dict]      # canonical rows (messages, or prompt/chosen/rejected)
    out_dir: Path             # where the stage writes (a temp dir, renamed when done)
    lora: Any = None          # LoraSpec or None
    show_progress: bool = False
    report_to: list[str] = field(default_factory=list)  # ["wandb"] inside a tracked stage run
    # The engine's hooks (all optional: a bare context trains in memory, start to end).
    dataset_dir: Path | None = None   # the rows as an on-disk Arrow dataset: TRL's maps are cached beside it
    start_key: str | None = None      # identity of `start` (its stage key): names cached reference log-probs
    reflogps_dir: Path | None = None  # where reference log-probs are cached (None: not cached)
    checkpoint: "CheckpointPolicy | None" = None
    resume_from: Path | None = None   # a checkpoint of this same stage to continue from
    stop_requested: Any = None        # callable -> bool: stop at the next step boundary (Ctrl-C)
    eval_examples: list[dict] | None = None   # held-out rows (eval_data): their loss is measured
    batch: "BatchLayout | None" = None       # the global batch on this run's processes (None: resolved here)
    resolved: dict | None = None             # plan.resolved: strategy and GPU defaults (None: resolved here)


@dataclass
class CheckpointPolicy:
    every_steps: int | None = None
    every_minutes: float | None = None
    keep: int = 2             # the newest checkpoints kept (output.save_total_limit)


class StageInterrupted(Exception):
    """Training stopped at a step boundary on request; its checkpoint is saved."""

    def __init__(self, step: int, max_steps: int, checkpoint: Path | None):
        super().__init__(f"stopped at step {step}/{max_steps}")
        self.step, self.max_steps, self.checkpoint = step, max_steps, checkpoint


@dataclass
class StageResult:
    adapter: bool             # True: out_dir/model holds a LoRA adapter, not full weights
    metrics: dict             # final losses / rewards from the trainer log
    cost: dict                # train tokens, steps, passes, wall time, peak memory


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_start(ctx: StageContext):
    """(model, tokenizer, LoRA config or None): the model the stage starts from and, with
    LoRA, the adapter that trains on it (with the rows of tokens the template added)."""
    import torch

    torch.manual_seed(ctx.seed)
    attention = stage_settings(ctx)["attn_implementation"]   # the recipe's, else the GPU default
    loaded = load_model(replace(ctx.start, attn_implementation=ctx.start.attn_implementation or attention))
    lora = lora_config(ctx.lora, loaded.model, loaded.added_token_ids) if ctx.lora else None
    return loaded.model, loaded.tokenizer, lora


def start_with_reference(ctx: StageContext):
    """(model, tokenizer, LoRA config, reference) for a method that compares against the
    model the stage starts from (DPO, KTO). The reference handed to TRL is None with LoRA
    (the adapter disabled is the reference) or with precomputed log-probs; otherwise a
    frozen copy of the starting model (TRL would rebuild one from the model's hub name)."""
    import copy

    model, tokenizer, lora = load_start(ctx)
    reference = None
    # Under FSDP TRL scores precomputed log-probs with a reference model (the policy is
    # sharded only when training starts); without one it would rebuild it from the model's
    # hub name, which a builtin or trained model does not have.
    sharded = stage_settings(ctx)["strategy"] == "fsdp2"
    if lora is None and (sharded or not ctx.spec.precompute_ref_log_probs):
        reference = copy.deepcopy(model).eval()
    return model, tokenizer, lora, reference


def reference_config(ctx: StageContext) -> dict:
    """The config settings DPO and KTO share, named once: the reference is the starting
    model, scored once up front when precomputed (in batches of the training batch size),
    never synced to the policy; dropout off in both; sequences cut at max_length."""
    spec = ctx.spec
    return dict(
        max_length=spec.max_length,
        precompute_ref_log_probs=spec.precompute_ref_log_probs,
        precompute_ref_batch_size=batch_layout(ctx).per_device_batch,
        sync_ref_model=False,
        disable_dropout=True,
        activation_offloading=False,
        dataset_num_proc=spec.dataset_num_proc,
    )


def trainer_kwargs(ctx: StageContext) -> dict:
    """Every TrainingArguments setting a stage depends on, named explicitly.

    TRL's configs default to bf16=True and gradient_checkpointing=True, which are
    5-16x slower on CPU; nothing is left to those defaults.
    """
    spec = ctx.spec
    on_gpu = device() == "cuda"
    layout = batch_layout(ctx)
    settings = stage_settings(ctx)
    checkpointing = settings["gradient_checkpointing"]
    return dict(
        output_dir=str(ctx.out_dir / "trainer"),
        # The recipe's batch_size x gradient_accumulation is the global batch, shared by
        # the processes (posttrain.distributed): the same optimisation on any world size.
        per_device_train_batch_size=layout.per_device_batch,
        gradient_accumulation_steps=layout.gradient_accumulation,
        learning_rate=spec.learning_rate,
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps or -1,
        lr_scheduler_type=spec.scheduler,
        # An int is a number of steps; a float in [0, 1) a ratio of total steps.
        warmup_steps=spec.warmup_steps if spec.warmup_steps is not None else spec.warmup_ratio,
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        optim=spec.optim,
        seed=ctx.seed,
        data_seed=ctx.seed,
        bf16=resolve_precision(ctx.start.dtype).bf16,
        fp16=False,
        # The stage's setting, else on only when a GPU's memory estimate needs it (on CPU it
        # is 5-16x slower; posttrain.defaults); non-reentrant, the variant that works with
        # LoRA's frozen inputs. Under FSDP2 FSDP's own checkpointing does it (fsdp_config).
        **{checkpointing_field(): checkpointing and settings["strategy"] != "fsdp2",
           checkpointing_field() + "_kwargs": {"use_reentrant": False} if checkpointing else None},
        torch_compile=False,
        use_cpu=not on_gpu,
        # DDP: every parameter that trains gets a gradient at every step (LoRA's frozen
        # weights are not in DDP's reducer); transformers' default (True unless
        # checkpointing) costs an extra walk of the autograd graph per step. Mixture-of-
        # experts models leave unrouted experts without one, and need the walk.
        ddp_find_unused_parameters=layout.world_size > 1 and is_mixture_of_experts(ctx),
        # Pinned host memory speeds copies to a GPU (pure speed: in no key); no workers: the
        # rows are tokenized in memory and collating them is cheap.
        dataloader_num_workers=settings["dataloader_num_workers"],
        dataloader_pin_memory=settings["dataloader_pin_memory"],
        use_liger_kernel=settings["use_liger_kernel"],
        # How the processes share the model (fsdp/fsdp_config or deepspeed): through the
        # TrainingArguments, so it holds under torchrun as under accelerate launch.
        **strategy_kwargs(settings, checkpointing),
        logging_steps=spec.logging_steps,
        logging_first_step=True,
        # The divergence guard stops at the first non-finite loss; the filter would only
        # replace it in the logged average by earlier losses (how "loss 0" was logged).
        logging_nan_inf_filter=False,
        # Checkpoints are requested by StageControl (every N steps and/or minutes, and on
        # Ctrl-C), never by strategy; each holds optimizer, scheduler and RNG state so a
        # resumed stage continues exactly. The two newest are kept.
        save_strategy="no",
        save_total_limit=(ctx.checkpoint or CheckpointPolicy()).keep,
        save_only_model=False,
        report_to=list(ctx.report_to),
        disable_tqdm=not ctx.show_progress,
        remove_unused_columns=False,
        # Held-out loss: every eval_steps steps when given, and once at the end (run_training).
        eval_strategy="steps" if ctx.eval_examples and spec.eval_steps else "no",
        eval_steps=spec.eval_steps,
        per_device_eval_batch_size=layout.per_device_batch,
    )


def is_mixture_of_experts(ctx: StageContext) -> bool:
    """Whether the starting model routes tokens to some of its experts (Mixtral, Qwen-MoE...),
    read from its config (no weights loaded)."""
    from posttrain.models import model_config

    config = model_config(ctx.start)
    return any(getattr(config, name, None) for name in ("num_local_experts", "num_experts", "n_routed_experts"))


def stage_settings(ctx: StageContext) -> dict:
    """The stage's strategy and GPU defaults (`defaults.resolve_stage`): as the engine
    resolved them for the plan, or here for this machine (a context built in code)."""
    if ctx.resolved is None:
        from posttrain.defaults import machine, resolve_stage
        from posttrain.models import model_size
        from posttrain.recipe.schema import ModelSpec
        from posttrain.stages import METHODS

        facts = machine()
        size = model_size(ctx.start, ctx.lora) if facts.device == "cuda" else None
        model = ModelSpec(name=ctx.start.name, dtype=ctx.start.dtype, attn_implementation=ctx.start.attn_implementation)
        ctx.resolved = resolve_stage(ctx.spec, ctx.lora, model, "auto", batch_layout(ctx), facts, size,
                                     METHODS[ctx.spec.method].sequences)
    return ctx.resolved


def strategy_kwargs(settings: dict, checkpointing: bool) -> dict:
    """The TrainingArguments of the resolved strategy; none when the launcher's accelerate
    config set it up already (auto followed it: its settings rule)."""
    from posttrain.distributed import strategy_trainer_kwargs

    if "launcher" in settings.get("strategy_why", ""):
        return {}
    return strategy_trainer_kwargs(settings["strategy"], checkpointing)


def batch_layout(ctx: StageContext) -> BatchLayout:
    """The stage's global batch on this run's processes: as the engine resolved it, or here."""
    return ctx.batch or stage_layout(ctx.name, ctx.spec)


def trl_config(config_class, ctx: StageContext, **settings):
    """The method's TRL config: every TrainingArguments setting (`trainer_kwargs`), the
    method's own `settings`, then the recipe's passthrough (`stages.<name>.trainer`),
    which may change only what no recipe setting names (checked before training:
    `passthrough_problems`)."""
    import dataclasses

    kwargs = {**trainer_kwargs(ctx), **settings}
    fields = {f.name for f in dataclasses.fields(config_class)}
    refused = [f"{key}: {message}" for key, message in passthrough_problems(ctx.spec, fields)]
    if refused:   # checked before training; a recipe built in code reaches here unchecked
        from posttrain.errors import RecipeError

        raise RecipeError(f"stages.{ctx.name}.trainer: " + "; ".join(refused))
    return config_class(**{**kwargs, **ctx.spec.trainer})


def passthrough_problems(spec, fields: set[str]) -> list[tuple[str, str]]:
    """[(key, why)] for each `trainer:` key that is not a field of the method's TRL config
    (`fields`), or that a recipe setting names, or that posttrain owns."""
    import difflib

    problems = []
    for key in spec.trainer:
        if key in type(spec).model_fields:
            problems.append((key, f"a recipe setting: write it as {key} beside the stage's other settings"))
        elif key in NAMED_ELSEWHERE:
            problems.append((key, f"a recipe setting: {NAMED_ELSEWHERE[key]}"))
        elif key in MANAGED:
            problems.append((key, f"posttrain sets it ({MANAGED[key]})"))
        elif key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            problems.append((key, "not a field of the method's TRL config" + (f"; did you mean {close[0]!r}?"
                                                                                if close else "")))
    return problems


# TRL / TrainingArguments fields a recipe sets under another name: `trainer:` may not set them.
NAMED_ELSEWHERE = {
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "gradient_accumulation",
    "num_train_epochs": "epochs", "lr_scheduler_type": "scheduler", "warmup_ratio": "warmup_ratio",
    "gradient_checkpointing": "gradient_checkpointing", "activation_checkpointing": "gradient_checkpointing",
    "bf16": "model.dtype", "fp16": "model.dtype", "seed": "seed", "data_seed": "seed",
    "eval_strategy": "eval_data / eval_steps", "save_total_limit": "output.save_total_limit",
    "report_to": "tracking", "push_to_hub": "posttrain export --push-to-hub",
    "hub_model_id": "posttrain export --push-to-hub", "model_init_kwargs": "model (dtype, attn_implementation, ...)",
    "ref_model_init_kwargs": "model", "use_liger_kernel": "use_liger_kernel",
    "fsdp": "distributed.strategy", "fsdp_config": "distributed.strategy", "deepspeed": "distributed.strategy",
}
# Fields posttrain owns for the run's mechanics: `trainer:` may not set them.
MANAGED = {
    "output_dir": "each stage trains in its own cache folder",
    "save_strategy": "checkpoints follow output.checkpoint_minutes / checkpoint_steps",
    "save_steps": "checkpoints follow output.checkpoint_minutes / checkpoint_steps",
    "save_only_model": "a resumed stage needs the optimizer state", "resume_from_checkpoint": "posttrain resumes",
    "use_cpu": "the device is the machine's", "disable_tqdm": "progress follows --progress",
    "logging_nan_inf_filter": "the divergence guard needs every loss", "logging_first_step": "the trainer log",
    "remove_unused_columns": "posttrain's rows keep their columns", "per_device_eval_batch_size": "batch_size",
    "precompute_ref_batch_size": "batch_size", "sync_ref_model": "the reference is the stage's starting model",
    "dataloader_num_workers": "rows are already tokenized in memory", "torch_compile": "a later release",
    "assistant_only_loss": "SFT's loss is on the assistant's replies, masked as the chat template allows",
    "completion_only_loss": "SFT's loss is on the assistant's replies, masked as the chat template allows",
}


def checkpointing_field() -> str:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing (old name warns)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


class CostMeter:
    """Wall time and peak memory of one stage: max allocated on GPU, else peak RSS.

    RSS is sampled by a background thread while the stage runs, so a stage's peak
    is its own (the process-wide ru_maxrss would carry earlier stages' peaks over).
    """

    sample_every_s = 0.1

    def __enter__(self):
        import threading

        import psutil
        import torch

        self.on_gpu = torch.cuda.is_available()
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats()
        self._process = psutil.Process()
        self._peak_rss = self._process.memory_info().rss
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        self.start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_every_s):
            self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)

    def __exit__(self, *exc):
        import torch

        self.wall_s = time.perf_counter() - self.start
        self._stop.set()
        self._sampler.join()
        self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)
        self.peak_reserved_mb = None   # GPU only: what the caching allocator held at its peak
        if self.on_gpu:
            self.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20
            self.peak_reserved_mb = torch.cuda.max_memory_reserved() / 2**20
            self.memory_kind = "cuda_max_allocated"
        else:
            self.peak_memory_mb = self._peak_rss / 2**20
            self.memory_kind = "peak_rss_during_stage"
        return False


def eval_dataset(ctx: StageContext):
    """The held-out rows (eval_data) as a datasets.Dataset, or None."""
    from datasets import Dataset

    return Dataset.from_list(ctx.eval_examples) if ctx.eval_examples else None


def train_dataset(ctx: StageContext):
    """The stage's rows as a datasets.Dataset: memory-mapped from the cache when the
    engine stored them there (so TRL's tokenization is cached by `datasets`), else in memory."""
    from datasets import Dataset, load_from_disk

    if ctx.dataset_dir is not None:
        return load_from_disk(str(ctx.dataset_dir))
    return Dataset.from_list(ctx.examples)


def stage_control(ctx: StageContext):
    """A TrainerCallback that saves checkpoints by the policy and stops on request."""
    from transformers import TrainerCallback

    from posttrain.cache import PROGRESS_FILE

    policy = ctx.checkpoint or CheckpointPolicy()

    class StageControl(TrainerCallback):
        stopped = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = self.last_save = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            due_by_steps = policy.every_steps and state.global_step % policy.every_steps == 0
            due_by_time = policy.every_minutes and time.monotonic() - self.last_save >= 60 * policy.every_minutes
            # Every rank must stop (and save) at the same step, and clocks differ: rank 0 decides.
            stop, due_by_time = agreed(args, ctx.stop_requested is not None and ctx.stop_requested(), due_by_time)
            if stop:
                self.stopped = control.should_training_stop = control.should_save = True
            elif (due_by_steps or due_by_time) and state.global_step < state.max_steps:
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            # transformers has written the checkpoint (model, optimizer, RNG, state);
            # this marker makes it count as complete for a resume.
            self.last_save = time.monotonic()
            if not state.is_world_process_zero:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            # The stage's loss so far (the mean train_loss_mean reports covers every step,
            # resumed or not): this attempt's steps (the guard's) plus the earlier attempts'.
            losses = getattr(self, "guard", None)
            Area(args.output_dir).write_text(folder / PROGRESS_FILE, json.dumps(
                {"step": state.global_step, "wall_s": round(self.prior_wall_s + self.last_save - self.started, 2),
                 "loss_sum": self.prior_loss[0] + (losses.loss_sum if losses else 0.0),
                 "loss_steps": self.prior_loss[1] + (losses.loss_steps if losses else 0)}))

    control = StageControl()
    control.prior_wall_s, control.prior_loss = 0.0, (0.0, 0)
    if ctx.resume_from is not None:
        progress = json.loads((Path(ctx.resume_from) / PROGRESS_FILE).read_text())
        control.prior_wall_s = progress["wall_s"]
        control.prior_loss = (progress.get("loss_sum", 0.0), progress.get("loss_steps", 0))  # (older markers: none)
    return control


def agreed(args, stop: bool, due_by_time: bool) -> tuple[bool, bool]:
    """A step's stop request and time-based checkpoint, the same on every training process
    (one process: its own): stop when any rank was asked to, checkpoint by rank 0's clock.
    One all-reduce of two numbers per optimizer step."""
    if getattr(args, "world_size", 1) <= 1:
        return bool(stop), bool(due_by_time)
    import torch
    import torch.distributed as dist

    flags = torch.tensor([1.0 if stop else 0.0, 1.0 if due_by_time and args.process_index == 0 else 0.0],
                         device=args.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)   # the others add 0 to rank 0's clock
    stop_any, due_on_rank0 = flags.tolist()   # one host sync
    return bool(stop_any), bool(due_on_rank0)


def run_training(trainer, ctx: StageContext) -> dict:
    """Train (resuming when asked); raise StageInterrupted when stopped early on request.

    Returns what the cost summary needs to know about earlier attempts.
    """
    from posttrain.cache import checkpoint_step, latest_checkpoint

    control = stage_control(ctx)
    trainer.add_callback(control)
    control.guard = guard = divergence_guard(trainer)
    trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
    steps = control.prior_loss[1] + guard.loss_steps
    summary = next((e for e in reversed(trainer.state.log_history) if "train_loss" in e), None)
    if summary is not None and steps:
        # transformers' train_loss covers only the steps since a resume, and adds the steps
        # since its last log un-gathered (rank 0's own losses): the guard's mean is of every
        # step of the stage, each step's loss averaged over the ranks.
        summary["train_loss"] = (control.prior_loss[0] + guard.loss_sum) / steps
    if trainer.eval_dataset is not None and not control.stopped:
        trainer.evaluate()   # the held-out loss of the trained model, in the trainer log
    if control.stopped and trainer.state.global_step < trainer.state.max_steps:
        raise StageInterrupted(trainer.state.global_step, trainer.state.max_steps,
                               latest_checkpoint(Path(trainer.args.output_dir)))
    return {"resumed_from_step": checkpoint_step(ctx.resume_from) if ctx.resume_from else None,
            "earlier_attempts_wall_s": control.prior_wall_s}


@dataclass(frozen=True)
class SequenceTokens:
    """A trained dataset's sequences, each capped at max_length as its trainer caps it."""

    tokens: int          # tokens the model processes per epoch (pads excluded)
    over: Any            # per row: a sequence longer than max_length (the collator cuts it)
    at_limit: Any        # per row: a sequence exactly max_length long (cut already, or whole)


def examples_in(dataset) -> int:
    """The examples a trainer's dataset holds: a packed row (SFT `packing`) holds several,
    one per entry of TRL's `seq_lengths`, so counting rows would report conversations as
    dropped that were packed together."""
    if "seq_lengths" in dataset.column_names:
        import pyarrow.compute as pc

        lengths = dataset.select_columns(["seq_lengths"]).with_format("arrow")[:].column("seq_lengths")
        return int(pc.sum(pc.list_value_length(lengths)).as_py() or 0)
    return len(dataset)


def dataset_tokens(dataset, sequences: tuple[tuple[str, ...], ...], max_length: int | None) -> SequenceTokens:
    """Each row's training sequences, `sequences` naming the token columns each one
    concatenates (DPO: prompt+chosen and prompt+rejected), capped at `max_length`.

    Read from the Arrow columns' lengths in the dataset's row order, not row by row.
    """
    import numpy as np
    import pyarrow.compute as pc

    columns = sorted({column for sequence in sequences for column in sequence})
    table = dataset.select_columns(columns).with_format("arrow")[:]
    lengths = {column: pc.list_value_length(table.column(column)).to_numpy(zero_copy_only=False).astype("int64")
               for column in columns}
    limit = max_length or np.iinfo("int64").max
    tokens, over, at_limit = 0, np.zeros(len(dataset), bool), np.zeros(len(dataset), bool)
    for sequence in sequences:
        full = sum(lengths[column] for column in sequence)
        tokens += int(np.minimum(full, limit).sum())
        over |= full > limit
        at_limit |= full == limit
    return SequenceTokens(tokens, over, at_limit)


@dataclass
class Trained:
    """A stage's trainer after training, with what its cost summary needs."""

    trainer: Any
    tokenizer: Any
    meter: CostMeter
    attempts: dict   # earlier attempts (resumed_from_step, earlier_attempts_wall_s)
    tokens: Any = None   # telemetry.TokenCounter: the tokens of the trained forwards

    @property
    def epochs(self) -> float:
        return self.trainer.state.epoch or 0.0

    def reference_forwards(self, precomputed: bool, per_example: int) -> int:
        """A frozen reference's passes: `per_example` scores per example, once up front when
        precomputed (a pipeline's cost, even when this run found them cached), else each epoch."""
        examples = len(self.trainer.train_dataset)
        return per_example * examples if precomputed else round(per_example * examples * self.epochs)


def train_built(ctx: StageContext, build_trainer) -> Trained:
    """Build the stage's trainer with `build_trainer(ctx)` and train it, metered."""
    with CostMeter() as meter:
        trainer, tokenizer = build_trainer(ctx)
        tokens = count_tokens(trainer)
        attempts = run_training(trainer, ctx)
    tokens.remove()
    return Trained(trainer, tokenizer, meter, attempts, tokens)


def count_tokens(trainer):
    """A TokenCounter on the trainer's model (and its separate reference, if any), counting
    while the trainer trains (posttrain.telemetry)."""
    from posttrain.telemetry import TokenCounter

    counter = TokenCounter(trainer.model, getattr(trainer, "ref_model", None))
    trainer.add_callback(counter.callback(trainer.accelerator))
    return counter


def throughput_cost(ctx: StageContext, done: Trained) -> dict:
    """The Cost fields of throughput: tokens/s over the trainer's train_runtime, MFU
    against the device's peak (None on CPU, float32 or an unknown device), world size."""
    import torch

    from posttrain.telemetry import model_shape, peak_flops, throughput

    if done.tokens is None:
        return {}
    runtime = next((e["train_runtime"] for e in reversed(done.trainer.state.log_history) if "train_runtime" in e), None)
    device_name = torch.cuda.get_device_name() if done.meter.on_gpu else "cpu"
    peak = peak_flops(device_name if done.meter.on_gpu else None, resolve_precision(ctx.start.dtype).dtype)
    reserved = done.meter.peak_reserved_mb
    return dict(throughput(done.tokens.counts, model_shape(done.trainer.model), runtime,
                           batch_layout(ctx).world_size, peak),
                device_name=device_name, peak_memory_reserved_mb=round(reserved, 1) if reserved is not None else None)


def finish(ctx: StageContext, done: Trained, *, sequences: tuple[tuple[str, ...], ...], cut_rows=None,
           extra_forwards: int = 0, extra_cost: dict | None = None) -> StageResult:
    """Save the model/adapter, the trainer log, and summarise cost and final metrics.

    Passes count sequences, as many per example as the method declares
    (`Method.sequences`: an SFT example is one, a preference pair two: chosen and
    rejected). `extra_forwards` adds forwards without a backward (a frozen reference's;
    KTO's KL sequences). The final
    metrics are the method's declared `metrics`.
    Train tokens are the tokens of `sequences` (dataset_tokens) after max_length cut them;
    rows_truncated the rows with a sequence cut. A trainer that cuts while tokenizing
    keeps no uncut length: its `cut_rows(done, rows)` says which of the rows that reach
    max_length exactly were cut (SFT, ORPO/CPO); the others cut in the collator.
    A resumed stage's wall time adds the earlier attempts' time up to their last
    checkpoint (work lost after it is not counted).
    """
    from posttrain.stages import METHODS

    method = METHODS[ctx.spec.method]
    trainer, tokenizer, meter, attempts = done.trainer, done.tokenizer, done.meter, done.attempts
    refuse_nonfinite_weights(trainer)
    area = Area(ctx.out_dir)
    model_dir = ctx.out_dir / "model"
    main = trainer.accelerator.is_main_process   # under a launcher only rank 0 writes the stage
    if ctx.lora:
        # The adapter with the trained rows of added tokens, not whole embedding matrices:
        # every load rebuilds the base's rows identically (models.grow_embeddings) first.
        if trainer.args.should_save:
            trainer.model.save_pretrained(str(model_dir), save_embedding_layers=False)
    else:
        trainer.save_model(str(model_dir))   # every rank calls it: gathering sharded weights is collective
    log = trainer.state.log_history
    if main:
        tokenizer.save_pretrained(str(model_dir))
        area.write_text(ctx.out_dir / TRAINER_LOG, "".join(json.dumps(entry) + "\n" for entry in log))
    epochs_done = trainer.state.epoch or 0.0
    examples = examples_in(trainer.train_dataset)
    examples_seen = round(examples * epochs_done)
    from posttrain.records import Cost

    counted = dataset_tokens(trainer.train_dataset, sequences, ctx.spec.max_length)
    cost = Cost(  # as JSON (records.Cost is its one writer): StageResult.cost is read by key
        optimizer_steps=trainer.state.global_step,
        examples_seen=examples_seen,
        train_tokens=round(counted.tokens * epochs_done),
        forward_passes=examples_seen * method.sequences + extra_forwards,
        backward_passes=examples_seen * method.sequences,
        wall_s=round(meter.wall_s + attempts.get("earlier_attempts_wall_s", 0.0), 2),
        resumed_from_step=attempts.get("resumed_from_step"),
        peak_memory_mb=round(meter.peak_memory_mb, 1),
        peak_memory_kind=meter.memory_kind,
        rows_given=len(ctx.examples) if ctx.examples is not None else None,
        rows_trained=examples,
        rows_truncated=int(counted.over.sum()) if cut_rows is None else cut_rows(done, counted.at_limit.nonzero()[0]),
        extra=dict(extra_cost or {}),
        **throughput_cost(ctx, done),
    ).to_json()
    # Checkpoints exist to resume this stage; once it is finished they are dead weight.
    trainer.accelerator.wait_for_everyone()
    if main:
        area.rmtree(ctx.out_dir / "trainer")
    return StageResult(adapter=bool(ctx.lora), metrics=final_metrics(log, method.metrics), cost=cost)


def final_metrics(log: list[dict], keys: tuple[str, ...]) -> dict:
    """The last logged value of each key (training curves stay in trainer_log.jsonl)."""
    out: dict[str, float] = {}
    for entry in log:
        for key in keys:
            if key in entry:
                out[key] = entry[key]
    evals = [e["eval_loss"] for e in log if "eval_loss" in e]
    if evals:
        out["eval_loss"] = evals[-1]
    summary = next((e for e in reversed(log) if "train_loss" in e), {})
    if "train_loss" in summary:
        out["train_loss_mean"] = summary["train_loss"]
    return out


def quiet_trainer(trainer, ctx: StageContext):
    """The built trainer, ready: its LM head readable by TRL's fused head (see
    `head_bias_for_fused_head`), and quiet: without progress bars transformers prints
    every log dict; the stage summary suffices."""
    head_bias_for_fused_head(trainer.model)
    if not ctx.show_progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def head_bias_for_fused_head(model) -> None:
    """TRL 1.16's fused LM head reads `lm_head.weight` and `lm_head.bias`. When the rows of
    added tokens train (LoRA), peft wraps the head in a TrainableTokensWrapper, whose
    `weight` is the merged, trainable matrix but which has no `bias` (AttributeError at
    the first step). Give it the wrapped head's bias (None for most LMs), unregistered,
    so nothing new is saved."""
    from peft.utils import TrainableTokensWrapper

    for module in model.modules():
        if isinstance(module, TrainableTokensWrapper) and "bias" not in module.__dict__:
            object.__setattr__(module, "bias", getattr(module.original_module, "bias", None))


def quiet_transformers() -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # TRL 1.16 reads a property transformers 5 deprecated, once per DPO step: noise, not news.
    warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
