"""The divergence guard: every optimizer step's loss and gradient norm checked, and the
final weights, so that a diverged stage stops at once and nothing of it is published
or resumed from (StageDiverged carries what the failure record and message need)."""

from __future__ import annotations

import math
from typing import Any


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

    def message(self, ctx: Any) -> str:   # a stages.common.StageContext
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
            self.loss_sum, self.loss_steps = 0.0, 0   # this attempt's steps, averaged over the ranks

        def add_loss(self, loss):
            loss = loss.detach() if hasattr(loss, "detach") else loss
            self.step_loss = loss if self.step_loss is None else self.step_loss + loss

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            norm = self.grad_norm if self.grad_norm is not None else gradient_norm(model)
            # Every rank must judge the same step the same way (the gradient norm is of the
            # all-reduced gradients already): the step's loss averaged over the ranks.
            loss, norm = host_floats(mean_over_ranks(args, self.step_loss), norm)
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
                self.loss_sum, self.loss_steps = self.loss_sum + loss, self.loss_steps + 1

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


def mean_over_ranks(args, loss):
    """A step's loss (a device tensor, or None) averaged over the training processes."""
    if loss is None or getattr(args, "world_size", 1) <= 1 or not hasattr(loss, "detach"):
        return loss
    import torch.distributed as dist

    total = loss.detach().float().clone()
    dist.all_reduce(total)   # SUM: gloo has no AVG
    return total / args.world_size


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
