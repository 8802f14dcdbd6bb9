"""What every stage shares: the context it runs in, explicit trainer settings, cost."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.artifacts import TRAINER_LOG, Area
from posttrain.models import ModelSource, load_model_and_tokenizer, lora_config


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


@dataclass
class CheckpointPolicy:
    every_steps: int | None = None
    every_minutes: float | None = None


class StageInterrupted(Exception):
    """Training stopped at a step boundary on request; its checkpoint is saved."""

    def __init__(self, step: int, max_steps: int, checkpoint: Path | None):
        super().__init__(f"stopped at step {step}/{max_steps}")
        self.step, self.max_steps, self.checkpoint = step, max_steps, checkpoint


class StageDiverged(Exception):
    """Training produced a non-finite or exploded loss, a non-finite grad norm (checked every
    optimizer step, see `divergence`), or non-finite final weights; nothing of the stage
    may be published or resumed from."""

    def __init__(self, step: int, max_steps: int, reason: str, last_finite: tuple[int, float] | None = None,
                 recent: list[dict] | None = None):
        super().__init__(f"diverged at step {step}/{max_steps}: {reason}")
        self.step, self.max_steps, self.reason = step, max_steps, reason
        self.last_finite = last_finite   # (step, loss) of the last step whose loss was finite
        self.recent = list(recent or [])  # the last steps' {step, loss, grad_norm}, newest last

    def details(self) -> dict:
        """For the failure record; strict JSON, so NaN and inf are written as strings."""
        def number(value):
            return value if value is None or math.isfinite(value) else str(value)

        return {"max_steps": self.max_steps, "reason": self.reason,
                "last_finite_loss": ({"step": self.last_finite[0], "loss": self.last_finite[1]}
                                     if self.last_finite else None),
                "recent_steps": [{key: number(value) if key != "step" else value for key, value in row.items()}
                                 for row in self.recent]}

    def message(self, ctx: "StageContext") -> str:
        """The user's message: where, what, the last finite loss, and what to change (by recipe key)."""
        spec = ctx.spec
        last = (f"last finite loss {self.last_finite[1]:.4g} at step {self.last_finite[0]}" if self.last_finite
                else "no finite loss before it")
        return (f"stage {ctx.name} (seed {ctx.seed}) diverged at step {self.step}/{self.max_steps}: {self.reason} "
                f"({last}). Nothing of it was published or kept to resume from. Try a lower "
                f"stages.{ctx.name}.learning_rate (now {spec.learning_rate:g}), check "
                f"stages.{ctx.name}.max_grad_norm (now {spec.max_grad_norm:g}; smaller clips harder), "
                f"{dtype_hint(ctx.start.dtype)}")


def dtype_hint(dtype: str) -> str:
    if dtype == "float16":
        return "and model.dtype (float16 overflows past 65504: bfloat16 or float32 have the range)"
    if dtype in ("bfloat16", "auto"):
        return f"and model.dtype (now {dtype}: float32 rules out low-precision rounding)"
    return f"and model.dtype (now {dtype}, already the widest)"


@dataclass
class StageResult:
    adapter: bool             # True: out_dir/model holds a LoRA adapter, not full weights
    metrics: dict             # final losses / rewards from the trainer log
    cost: dict                # train tokens, steps, passes, wall time, peak memory


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_start(ctx: StageContext):
    import torch

    torch.manual_seed(ctx.seed)
    model, tokenizer = load_model_and_tokenizer(ctx.start)
    return model, tokenizer


def start_with_reference(ctx: StageContext):
    """(model, tokenizer, LoRA config, reference) for a method that compares against the
    model the stage starts from (DPO, KTO). The reference handed to TRL is None with LoRA
    (the adapter disabled is the reference) or with precomputed log-probs; otherwise a
    frozen copy of the starting model (TRL would rebuild one from the model's hub name)."""
    import copy

    model, tokenizer = load_start(ctx)
    lora = peft_config(ctx)
    reference = None
    if lora is None and not ctx.spec.precompute_ref_log_probs:
        reference = copy.deepcopy(model).eval()
    return model, tokenizer, lora, reference


def trainer_kwargs(ctx: StageContext) -> dict:
    """Every TrainingArguments setting a stage depends on, named explicitly.

    TRL's configs default to bf16=True and gradient_checkpointing=True, which are
    5-16x slower on CPU; nothing is left to those defaults.
    """
    spec = ctx.spec
    on_gpu = device() == "cuda"
    return dict(
        output_dir=str(ctx.out_dir / "trainer"),
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation,
        learning_rate=spec.learning_rate,
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps or -1,
        lr_scheduler_type=spec.scheduler,
        warmup_steps=spec.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        optim="adamw_torch",
        seed=ctx.seed,
        data_seed=ctx.seed,
        bf16=on_gpu and ctx.start.dtype in ("bfloat16", "auto"),
        fp16=False,
        **{checkpointing_field(): False},
        torch_compile=False,
        use_cpu=not on_gpu,
        dataloader_num_workers=0,
        logging_steps=spec.logging_steps,
        logging_first_step=True,
        # The divergence guard stops at the first non-finite loss; the filter would only
        # replace it in the logged average by earlier losses (how "loss 0" was logged).
        logging_nan_inf_filter=False,
        # Checkpoints are requested by StageControl (every N steps and/or minutes, and on
        # Ctrl-C), never by strategy; each holds optimizer, scheduler and RNG state so a
        # resumed stage continues exactly. The two newest are kept.
        save_strategy="no",
        save_total_limit=2,
        save_only_model=False,
        report_to=list(ctx.report_to),
        disable_tqdm=not ctx.show_progress,
        remove_unused_columns=False,
    )


def checkpointing_field() -> str:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing (old name warns)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def peft_config(ctx: StageContext):
    return lora_config(ctx.lora) if ctx.lora else None


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
        if self.on_gpu:
            self.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20
            self.memory_kind = "cuda_max_allocated"
        else:
            self.peak_memory_mb = self._peak_rss / 2**20
            self.memory_kind = "peak_rss_during_stage"
        return False


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
            if ctx.stop_requested is not None and ctx.stop_requested():
                self.stopped = control.should_training_stop = control.should_save = True
            elif (due_by_steps or due_by_time) and state.global_step < state.max_steps:
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            # transformers has written the checkpoint (model, optimizer, RNG, state);
            # this marker makes it count as complete for a resume.
            self.last_save = time.monotonic()
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            Area(args.output_dir).write_text(folder / PROGRESS_FILE, json.dumps(
                {"step": state.global_step, "wall_s": round(self.prior_wall_s + self.last_save - self.started, 2)}))

    control = StageControl()
    control.prior_wall_s = 0.0
    if ctx.resume_from is not None:
        progress = json.loads((Path(ctx.resume_from) / PROGRESS_FILE).read_text())
        control.prior_wall_s = progress["wall_s"]
    return control


def run_training(trainer, ctx: StageContext) -> dict:
    """Train (resuming when asked); raise StageInterrupted when stopped early on request.

    Returns what the cost summary needs to know about earlier attempts.
    """
    from posttrain.cache import checkpoint_step, latest_checkpoint

    control = stage_control(ctx)
    trainer.add_callback(control)
    divergence_guard(trainer)
    trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
    if control.stopped and trainer.state.global_step < trainer.state.max_steps:
        raise StageInterrupted(trainer.state.global_step, trainer.state.max_steps,
                               latest_checkpoint(Path(trainer.args.output_dir)))
    return {"resumed_from_step": checkpoint_step(ctx.resume_from) if ctx.resume_from else None,
            "earlier_attempts_wall_s": control.prior_wall_s}


# fp16 loss scaling halves its scale on each skipped step, from 2**16: 40 skips in a row
# have tried every scale fp16 can represent (down to 2**-24), so the overflow is not a
# scaling problem any more but a diverged model.
MAX_SKIPPED_IN_A_ROW = 40
RECENT_STEPS = 10   # per-step loss and grad norm kept for the failure record

# A finite loss has exploded past max(EXPLODED_LOSS_FLOOR, EXPLODED_LOSS_FACTOR x the
# stage's first finite loss). Learning rate 1e3 took SFT from 4.59 to 1.3e7 in one step,
# then to a dead model stuck at ln(vocab) with zero gradients: finite all along.
# - The floor is out of reach of healthy training for every loss we train. Cross-entropy
#   (SFT, ORPO's NLL term) starts at ~ln(vocab) <= 12.5 nats for vocabularies up to 256k;
#   1e4 nats per token means logits 1e4 apart, which only exploded weights produce. DPO's
#   sigmoid/hinge losses (and KTO, SimPO) start at ~0.69 and are >= 0: 1e4 means
#   beta x margin below -1e4, a swing of 1e5 nats at beta 0.1 (healthy DPO moves margins
#   by tens). The floor also covers a first loss near 0 (1e-3 on memorised data), where a
#   relative rule alone would stop at 1 and a new batch at loss 5 is normal.
# - The factor scales the rule for losses that start high (DPO's ipo and sppo_hard square
#   their margins: 25 and 50 at beta 0.1, 5e5 for sppo_hard at beta 1e-3): healthy training
#   lowers a loss (the quickstart's SFT never rose above 1.02x its first), its spikes stay
#   well within 10x, and 1000x leaves two orders of magnitude more.
# - The first loss is measured before any update (the base model's), so it is never
#   itself exploded; a resumed stage takes it from the restored log.
# Large finite gradient norms are not a criterion: their scale grows with parameter count
# and summed (not averaged) losses, norms of 1e2-1e4 are routine in healthy runs of large
# models, and clipping (max_grad_norm) bounds what they do to the weights; the loss shows
# the harm when it happens (in the run above the same step). Non-finite norms do stop.
EXPLODED_LOSS_FLOOR = 1e4
EXPLODED_LOSS_FACTOR = 1e3


def exploded_loss_limit(first_loss: float | None) -> float:
    """The loss above which a stage counts as exploded (see EXPLODED_LOSS_FLOOR)."""
    if first_loss is None or not math.isfinite(first_loss):
        return EXPLODED_LOSS_FLOOR
    return max(EXPLODED_LOSS_FLOOR, EXPLODED_LOSS_FACTOR * first_loss)


def divergence(loss: float | None, grad_norm: float | None, loss_scaling: bool,
               skipped_in_a_row: int = 0, first_loss: float | None = None) -> str | None:
    """Why an optimizer step counts as diverged, or None.

    A non-finite loss always does, and so does a finite loss past
    `exploded_loss_limit(first_loss)` (the stage's first finite loss; see
    EXPLODED_LOSS_FLOOR). A non-finite grad norm does too, except under fp16 loss
    scaling (a GradScaler), which skips such a step by design and lowers its scale --
    unless it has skipped MAX_SKIPPED_IN_A_ROW steps in a row. None means unknown.
    """
    if loss is not None and not math.isfinite(loss):
        return f"the loss is {loss}"
    if loss is not None and loss > exploded_loss_limit(first_loss):
        first = "" if first_loss is None else f" and {EXPLODED_LOSS_FACTOR:g} x the first loss {first_loss:.4g}"
        return (f"the loss exploded to {loss:.4g} (limit {exploded_loss_limit(first_loss):.4g}: the larger of "
                f"{EXPLODED_LOSS_FLOOR:g}{first})")
    if grad_norm is None or math.isfinite(grad_norm):
        return None
    if not loss_scaling:
        return f"the gradient norm is {grad_norm}"
    if skipped_in_a_row + 1 >= MAX_SKIPPED_IN_A_ROW:
        return f"fp16 loss scaling skipped {skipped_in_a_row + 1} steps in a row (gradient norm {grad_norm})"
    return None


def host_floats(*values) -> list[float | None]:
    """Device scalars, floats or None as floats: one host sync for all the tensors together."""
    import torch

    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    fetched = iter(torch.stack([t.detach().reshape(()).float().to(tensors[0].device) for t in tensors]).tolist()
                   if tensors else [])
    return [next(fetched) if isinstance(v, torch.Tensor) else None if v is None else float(v) for v in values]


def logged_losses(log: list[dict]) -> list[tuple[int, float]]:
    """(step, loss) of every finite loss in a trainer log (each an average over its logging steps)."""
    return [(entry["step"], entry["loss"]) for entry in log
            if isinstance(entry.get("loss"), (int, float)) and math.isfinite(entry["loss"]) and "step" in entry]


def last_logged_loss(log: list[dict]) -> tuple[int, float] | None:
    finite = logged_losses(log)
    return finite[-1] if finite else None


def first_logged_loss(log: list[dict]) -> tuple[int, float] | None:
    """The first one: step 1's loss alone (`logging_first_step`), the model before any update."""
    finite = logged_losses(log)
    return finite[0] if finite else None


def gradient_norm(model):
    """The gradients' total norm, for a trainer that does not expose its own. It runs after
    clipping, which keeps a non-finite norm non-finite (the gradients become NaN)."""
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
    return torch.nn.utils.get_total_norm(grads) if grads else None


def divergence_guard(trainer):
    """Check every optimizer step's loss and grad norm; raise StageDiverged at the first
    diverged one (`divergence`: non-finite, or a loss exploded), before the optimizer
    applies it (so no later checkpoint exists).

    Composed onto the trainer, not subclassed: its `training_step` (TRL's override
    included) is wrapped on the instance to add up the step's micro-batch losses, and
    `_get_grad_norm`, which transformers calls once per optimizer step (clipping or not),
    to keep the norm it already computed. Both stay device tensors until the check, one
    host sync of two numbers per optimizer step (transformers syncs only every
    `logging_steps`); never one per parameter.
    """
    from transformers import TrainerCallback

    loss_scaling = bool(trainer.args.fp16) or getattr(getattr(trainer, "accelerator", None), "scaler", None) is not None

    class DivergenceGuard(TrainerCallback):
        def __init__(self):
            self.step_loss = self.grad_norm = None   # this step's, on the device
            self.last_finite: tuple[int, float] | None = None
            self.first_loss: float | None = None     # the stage's first finite loss: the explosion rule's scale
            self.recent: list[dict] = []
            self.skipped_in_a_row = 0

        def add_loss(self, loss):
            loss = loss.detach() if hasattr(loss, "detach") else loss
            self.step_loss = loss if self.step_loss is None else self.step_loss + loss

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            norm = self.grad_norm if self.grad_norm is not None else gradient_norm(model)
            loss, norm = host_floats(self.step_loss, norm)
            self.step_loss = self.grad_norm = None
            step = state.global_step + 1
            self.recent = (self.recent + [{"step": step, "loss": loss, "grad_norm": norm}])[-RECENT_STEPS:]
            if self.first_loss is None:  # resumed: the restored log's first loss (step 1, the base model's)
                logged = first_logged_loss(getattr(state, "log_history", []))
                self.first_loss = logged[1] if logged else loss if loss is not None and math.isfinite(loss) else None
            reason = divergence(loss, norm, loss_scaling, self.skipped_in_a_row, self.first_loss)
            if reason:
                last = self.last_finite or last_logged_loss(getattr(state, "log_history", []))  # resumed: its log
                raise StageDiverged(step, state.max_steps, reason, last, self.recent)
            self.skipped_in_a_row = 0 if norm is None or math.isfinite(norm) else self.skipped_in_a_row + 1
            if loss is not None:
                self.last_finite = (step, loss)

    guard = DivergenceGuard()
    training_step = trainer.training_step

    def guarded_training_step(*args, **kwargs):
        loss = training_step(*args, **kwargs)
        guard.add_loss(loss)
        return loss

    trainer.training_step = guarded_training_step
    if hasattr(trainer, "_get_grad_norm"):
        get_grad_norm = trainer._get_grad_norm

        def kept_grad_norm(*args, **kwargs):
            guard.grad_norm = get_grad_norm(*args, **kwargs)
            return guard.grad_norm

        trainer._get_grad_norm = kept_grad_norm
    trainer.add_callback(guard)
    return guard


def dataset_tokens(dataset, columns: dict[str, int]) -> int:
    """Tokens the model processes per epoch: each column's lengths times how often it is fed.

    A DPO pair feeds its prompt twice (prompt+chosen, prompt+rejected); ORPO's
    chosen/rejected columns already include the prompt.
    """
    return sum(times * sum(len(ids) for ids in dataset[col])
               for col, times in columns.items() if col in dataset.column_names)


@dataclass
class Trained:
    """A stage's trainer after training, with what its cost summary needs."""

    trainer: Any
    tokenizer: Any
    meter: CostMeter
    attempts: dict   # earlier attempts (resumed_from_step, earlier_attempts_wall_s)

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
        attempts = run_training(trainer, ctx)
    return Trained(trainer, tokenizer, meter, attempts)


def finish(ctx: StageContext, done: Trained, *, token_columns: dict[str, int], extra_forwards: int = 0,
           extra_cost: dict | None = None) -> StageResult:
    """Save the model/adapter, the trainer log, and summarise cost and final metrics.

    Passes count sequences, as many per example as the method declares
    (`Method.sequences`: an SFT example is one, a preference pair two: chosen and
    rejected). `extra_forwards` adds forwards without a backward (a frozen reference's;
    KTO's KL sequences). The final
    metrics are the method's declared `metrics`.
    A resumed stage's wall time adds the earlier attempts' time up to their last
    checkpoint (work lost after it is not counted).
    """
    from posttrain.stages import METHODS

    method = METHODS[ctx.spec.method]
    trainer, tokenizer, meter, attempts = done.trainer, done.tokenizer, done.meter, done.attempts
    refuse_nonfinite_weights(trainer)
    area = Area(ctx.out_dir)
    model_dir = ctx.out_dir / "model"
    trainer.save_model(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    log = trainer.state.log_history
    area.write_text(ctx.out_dir / TRAINER_LOG, "".join(json.dumps(entry) + "\n" for entry in log))
    epochs_done = trainer.state.epoch or 0.0
    examples_seen = round(len(trainer.train_dataset) * epochs_done)
    from posttrain.records import Cost

    cost = Cost(  # as JSON (records.Cost is its one writer): StageResult.cost is read by key
        optimizer_steps=trainer.state.global_step,
        examples_seen=examples_seen,
        train_tokens=round(dataset_tokens(trainer.train_dataset, token_columns) * epochs_done),
        forward_passes=examples_seen * method.sequences + extra_forwards,
        backward_passes=examples_seen * method.sequences,
        wall_s=round(meter.wall_s + attempts.get("earlier_attempts_wall_s", 0.0), 2),
        resumed_from_step=attempts.get("resumed_from_step"),
        peak_memory_mb=round(meter.peak_memory_mb, 1),
        peak_memory_kind=meter.memory_kind,
        extra=dict(extra_cost or {}),
    ).to_json()
    # Checkpoints exist to resume this stage; once it is finished they are dead weight.
    area.rmtree(ctx.out_dir / "trainer")
    return StageResult(adapter=bool(ctx.lora), metrics=final_metrics(log, method.metrics), cost=cost)


def nonfinite_parameters(model) -> list[str]:
    """Names of the parameters that hold a NaN or an infinity.

    Each tensor is summed in float32 (a NaN or inf anywhere makes the sum non-finite)
    and the sums are checked together: one host sync for the whole model, and no
    tensor-sized temporary. A flagged tensor is confirmed element-wise (a sum can
    overflow where every element is finite).
    """
    import torch

    named = [(name, p.detach()) for name, p in model.named_parameters()]
    if not named:
        return []
    device = named[0][1].device
    with torch.no_grad():
        sums = torch.stack([p.sum(dtype=torch.float32).to(device) for _, p in named])
        if bool(torch.isfinite(sums).all()):
            return []
        return [name for (name, p), ok in zip(named, torch.isfinite(sums).tolist())
                if not ok and not bool(torch.isfinite(p).all())]


def refuse_nonfinite_weights(trainer) -> None:
    """Raise StageDiverged if the trained model (or adapter and its base) is not finite,
    whatever the cause: such a model must never reach the cache."""
    bad = nonfinite_parameters(trainer.model)
    if bad:
        guard = next((cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "DivergenceGuard"), None)
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise StageDiverged(trainer.state.global_step, trainer.state.max_steps,
                            f"the trained weights are not finite ({shown})",
                            guard.last_finite if guard else None, guard.recent if guard else None)


def final_metrics(log: list[dict], keys: tuple[str, ...]) -> dict:
    """The last logged value of each key (training curves stay in trainer_log.jsonl)."""
    out: dict[str, float] = {}
    for entry in log:
        for key in keys:
            if key in entry:
                out[key] = entry[key]
    summary = next((e for e in reversed(log) if "train_loss" in e), {})
    if "train_loss" in summary:
        out["train_loss_mean"] = summary["train_loss"]
    return out


def quiet_trainer(trainer, ctx: StageContext):
    """Without progress bars transformers prints every log dict; the stage summary suffices."""
    if not ctx.show_progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def quiet_transformers() -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # TRL 1.16 reads a property transformers 5 deprecated, once per DPO step: noise, not news.
    warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
