"""Divergence stops the stage: a non-finite or exploded loss, or a non-finite grad norm,
ends it at that step, the run exits 3 naming stage, seed and step, nothing of it is
published or resumed from, failed.json says which stage failed, and non-finite weights
never reach the cache.

NaNs are injected (a callback fills the embedding with NaN before a chosen step) so
each case is deterministic and a few steps long; two cases diverge for real at learning
rate 1e3 as reviewers saw them (float16 weights: NaN from step 2; float32: a finite loss
of 1.3e7 at step 2).
"""

import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from transformers import TrainerCallback

from posttrain.cli import main
from posttrain.stages.orpo import ORPOStage
from posttrain.stages.sft import SFTStage
from posttrain.data.builtin import instruction_rows, preference_rows
from posttrain.models import ModelSource
from posttrain.stages import common, run_stage
from posttrain.stages.common import StageContext
from posttrain.stages.divergence import (EXPLODED_LOSS_FLOOR, MAX_SKIPPED_IN_A_ROW, StageDiverged, divergence,
                                         divergence_guard, exploded_loss_limit, nonfinite_parameters)
from tiny_recipes import write_recipe

NAN, INF = float("nan"), float("inf")

RECIPE = """
name: diverge
model: {name: builtin:micro-llama}
data:
  ins: {source: builtin:skills, limit: 32}
  prefs: {source: builtin:skills-preferences, limit: 32}
stages:
  sft: {method: sft, data: ins, learning_rate: 1.0e-2, max_steps: 4, batch_size: 8, max_length: 96}
  dpo: {method: dpo, data: prefs, learning_rate: 1.0e-3, max_steps: 4, batch_size: 8, max_length: 96}
  orpo: {method: orpo, data: prefs, learning_rate: 1.0e-2, max_steps: 4, batch_size: 8, max_length: 96}
pipelines:
  PIPELINES
eval:
  tasks: [{repo}/evals/skills_exact.yaml]
  limit: 4
  samples: 0
output: {checkpoint_steps: 1}
report: {resamples: 100}
tracking: {wandb: {mode: disabled}}
"""
PIPELINES = {"sft": "sft: [sft]", "dpo": "sft+dpo: [sft, dpo]", "orpo": "orpo: [orpo]"}


class PoisonBefore(TrainerCallback):
    """Fill the first weight (the embedding) with NaN just before optimizer step `step`."""

    def __init__(self, step: int | None):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                next(model.parameters()).fill_(NAN)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.step is None:  # after the last step: only the final-weights check can see it
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = NAN


@pytest.fixture
def poison(monkeypatch):
    """poison(method, step): the trainers of that method get NaN weights before `step`."""
    real = common.divergence_guard

    def arm(method: str, step: int | None):
        def guard_and_poison(trainer):
            if method in type(trainer).__name__.lower():
                trainer.add_callback(PoisonBefore(step))
            return real(trainer)

        monkeypatch.setattr(common, "divergence_guard", guard_and_poison)

    return arm


def cache_entries(cache, stage):
    """(published stage dirs, partial dirs) of `stage` in the cache."""
    published = [p.parent for p in cache.glob("stages/*/stage.json")
                 if json.loads(p.read_text())["stage"] == stage]
    partial = [p for p in cache.glob("stages/.partial-*")
               if not (p / "pending.json").is_file() or json.loads((p / "pending.json").read_text())["stage"] == stage]
    return published, partial


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tiny_context(tmp_path, spec, dtype="float32"):
    rows = instruction_rows("train", 32) if spec.method == "sft" else preference_rows("train", 32)
    out = tmp_path / "stage"
    out.mkdir()
    return StageContext(name="stage", spec=spec, seed=0, start=ModelSource(name="builtin:micro-llama", dtype=dtype),
                        examples=rows, out_dir=out)


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("loss, grad_norm, loss_scaling, skipped, diverged", [
    (1.5, 2.0, False, 0, None),
    (NAN, 2.0, False, 0, "the loss is nan"),
    (INF, 2.0, False, 0, "the loss is inf"),
    (1.5, NAN, False, 0, "the gradient norm is nan"),
    (1.5, INF, False, 0, "the gradient norm is inf"),
    # fp16 loss scaling skips an overflowing step by design: not a divergence ...
    (1.5, INF, True, 0, None),
    (1.5, NAN, True, MAX_SKIPPED_IN_A_ROW - 2, None),
    # ... unless it skips every scale fp16 has, or the loss itself is not finite.
    (1.5, INF, True, MAX_SKIPPED_IN_A_ROW - 1, f"skipped {MAX_SKIPPED_IN_A_ROW} steps in a row"),
    (NAN, INF, True, 0, "the loss is nan"),
    (None, None, False, 0, None),
])
def test_which_steps_count_as_diverged(loss, grad_norm, loss_scaling, skipped, diverged):
    reason = divergence(loss, grad_norm, loss_scaling, skipped)
    assert reason == diverged if diverged is None else diverged in reason


def fake_trainer(losses, fp16=False):
    """What divergence_guard touches on a trainer, without one: no `_get_grad_norm`."""
    callbacks = []
    trainer = SimpleNamespace(args=SimpleNamespace(fp16=fp16), accelerator=SimpleNamespace(scaler=None),
                              training_step=lambda: torch.tensor(losses.pop(0)), add_callback=callbacks.append)
    return trainer, callbacks


def step_with_gradient(trainer, guard, step, grad_value):
    model = torch.nn.Linear(2, 1)
    model.weight.grad = torch.full_like(model.weight, grad_value)
    trainer.training_step()
    guard.on_pre_optimizer_step(None, SimpleNamespace(global_step=step - 1, max_steps=9), None, model=model)


def test_guard_computes_the_norm_itself_when_the_trainer_keeps_none():
    trainer, callbacks = fake_trainer([2.0, 1.0])
    guard = divergence_guard(trainer)
    assert callbacks == [guard]
    step_with_gradient(trainer, guard, 1, 0.5)
    with pytest.raises(StageDiverged) as caught:
        step_with_gradient(trainer, guard, 2, NAN)
    exc = caught.value
    assert (exc.step, exc.reason, exc.last_finite) == (2, "the gradient norm is nan", (1, 2.0))


def test_after_a_resume_the_last_finite_loss_comes_from_the_restored_log():
    trainer, _ = fake_trainer([NAN])
    guard = divergence_guard(trainer)
    trainer.training_step()
    log = [{"loss": 4.2, "step": 10}, {"loss": 3.9, "step": 20}, {"loss": NAN, "step": 25}, {"train_runtime": 1.0}]
    state = SimpleNamespace(global_step=30, max_steps=40, log_history=log)
    with pytest.raises(StageDiverged) as caught:
        guard.on_pre_optimizer_step(None, state, None, model=None)
    assert (caught.value.step, caught.value.last_finite) == (31, (20, 3.9))


def test_fp16_guard_lets_a_skipped_step_pass_and_stops_on_a_nan_loss():
    trainer, _ = fake_trainer([2.0, 1.5, NAN], fp16=True)
    guard = divergence_guard(trainer)
    step_with_gradient(trainer, guard, 1, INF)   # GradScaler skips this step: training goes on
    step_with_gradient(trainer, guard, 2, 0.5)
    with pytest.raises(StageDiverged, match="the loss is nan"):
        step_with_gradient(trainer, guard, 3, 0.5)


# ---------------------------------------------------------------- a finite loss that exploded


@pytest.mark.parametrize("first, loss, diverged", [
    (4.59, 1.29e7, True),          # the reviewer's SFT at learning rate 1e3, step 2
    (4.59, 9.9e3, False),          # below the floor
    (4.59, 1.01e4, True),
    (1e-3, 5.0, False),            # a new batch after memorised data: 5000x, normal
    (1e-3, 1.01e4, True),          # the floor holds for a tiny first loss
    (50.0, 4.9e4, False),          # IPO/SPPO start high (50 at beta 0.1): 1000x scales the limit
    (50.0, 5.1e4, True),
    (None, 1.01e4, True),          # first loss unknown: the floor alone
    (-2.0, 9e3, False),            # a negative first loss never lowers the limit below the floor
])
def test_explosion_rule(first, loss, diverged):
    reason = divergence(loss, 1.0, False, 0, first)
    assert (reason is not None) == diverged
    if diverged:
        assert reason.startswith(f"the loss exploded to {loss:.4g} (limit {exploded_loss_limit(first):.4g}")
    assert exploded_loss_limit(first) >= EXPLODED_LOSS_FLOOR


def run_guard(losses, log=None, start_step=0):
    """Feed per-step losses through a guard; the step it stopped at (StageDiverged) or None."""
    trainer, _ = fake_trainer(list(losses))
    guard = divergence_guard(trainer)
    state = SimpleNamespace(global_step=start_step, max_steps=start_step + len(losses), log_history=log or [])
    for _ in losses:
        trainer.training_step()
        try:
            guard.on_pre_optimizer_step(None, state, None, model=None)
        except StageDiverged as exc:
            return exc
        state.global_step += 1
    return None


HEALTHY = {
    # cross-entropy from ~ln(vocab): micro (104 tokens) and a 152k vocabulary, with spikes
    "sft": [4.6, 4.1, 3.2, 9.5, 2.4, 1.1, 30.0, 0.9],
    "sft large vocab": [11.9, 11.2, 8.0, 25.0, 3.1, 2.0],
    # DPO sigmoid from ln 2, overconfident near 0, then a batch it gets wrong
    "dpo": [0.693, 0.61, 0.2, 1e-4, 8.0, 0.05, 40.0],
    "orpo": [4.7, 4.3, 3.9, 12.0, 2.2],
    "memorised data": [1e-3, 2e-3, 5.0, 300.0, 1e-3],   # a fine-tune whose first loss is tiny
    "sppo beta 1e-3": [5e5, 4e5, 2e6, 1e5],             # squared terms start high
}


@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_loss_curves_never_count_as_exploded(name):
    assert run_guard(HEALTHY[name]) is None


@pytest.mark.parametrize("losses, step", [
    ([4.59, 1.29e7, 1.2e6, 4.615], 2),   # then a dead model at ln(vocab): stopped before it
    ([0.693, 0.5, 3e4], 3),               # DPO
    ([1e-3, 2e-3, 2e4], 3),               # a tiny first loss: the floor
])
def test_exploded_loss_stops_at_its_step(losses, step):
    exc = run_guard(losses)
    assert exc is not None and exc.step == step and exc.reason.startswith("the loss exploded")
    assert exc.last_finite == (step - 1, pytest.approx(losses[step - 2]))


def test_resumed_stage_measures_explosion_against_the_logged_first_loss():
    """After a resume the first loss the guard sees is the trained model's; the scale is step 1's."""
    log = [{"loss": 0.69, "step": 1}, {"loss": 0.4, "step": 10}, {"train_runtime": 1.0}]
    assert run_guard([2e4], log=log, start_step=10).step == 11   # 2e4 > max(1e4, 690)
    high = [{"loss": 50.0, "step": 1}]
    assert run_guard([2e4], log=high, start_step=10) is None     # limit 5e4


# ---------------------------------------------------------------- final weights


def test_final_weight_check_names_nan_and_inf_tensors_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    assert nonfinite_parameters(model) == []
    with torch.no_grad():
        model[0].bias[1] = NAN
        model[2].weight[0, 0] = -INF
        model[1].weight.fill_(3e38)  # finite, though its float32 sum overflows
    assert nonfinite_parameters(model) == ["0.bias", "2.weight"]


def test_nan_weights_after_the_last_step_are_never_saved(tmp_path, poison):
    poison("sft", None)
    ctx = tiny_context(tmp_path, SFTStage(method="sft", data="d", learning_rate=1e-2, max_steps=2, batch_size=8,
                                          max_length=96))
    with pytest.raises(StageDiverged, match=r"at step 2/2: the trained weights are not finite \(model.embed_tokens"):
        run_stage(ctx)
    assert not (ctx.out_dir / "model").exists()


def test_learning_rate_1e3_in_float16_stops_at_step_2(tmp_path):
    """For real: float16 weights (no loss scaling) overflow at the first update of 1e3."""
    ctx = tiny_context(tmp_path, ORPOStage(method="orpo", data="d", learning_rate=1e3, max_steps=6, batch_size=8,
                                           max_length=96), dtype="float16")
    with pytest.raises(StageDiverged) as caught:
        run_stage(ctx)
    exc = caught.value
    assert (exc.step, exc.reason, exc.last_finite[0]) == (2, "the loss is nan", 1)
    assert [row["step"] for row in exc.recent] == [1, 2]
    assert "model.dtype (float16 overflows" in exc.message(ctx)
    assert not (ctx.out_dir / "model").exists()


def test_orpo_drops_pairs_whose_prompt_fills_max_length():
    """TRL's ORPO kept them with an empty completion: loss 0/0 = NaN, every weight NaN after."""
    from datasets import Dataset

    from posttrain.stages.paired import trained_pairs

    pairs = Dataset.from_dict({"chosen_labels": [[-100, 5], [-100, -100], [-100, 7], [1]],
                               "rejected_labels": [[-100, 3], [-100, 4], [-100, -100], [2]]})
    assert trained_pairs(pairs).tolist() == [True, False, False, True]
    assert trained_pairs(pairs.select([3, 1, 0])).tolist() == [True, False, True]


def test_orpo_with_a_prompt_longer_than_max_length_trains_finite(tmp_path):
    ctx = tiny_context(tmp_path, ORPOStage(method="orpo", data="d", learning_rate=1e-2, max_steps=4, batch_size=8,
                                           max_length=96))
    # One of the 32 pairs has a prompt of 133 characters (= tokens): it fills max_length; the
    # others stay well below it.
    long_prompt = "How many words are in: " + " ".join(["kabo"] * 22) + "?"
    ctx.examples[5] = {"prompt": [{"role": "user", "content": long_prompt}],
                       "chosen": [{"role": "assistant", "content": "22"}],
                       "rejected": [{"role": "assistant", "content": "There are 22 words."}]}
    assert max(len(row["prompt"][0]["content"]) for i, row in enumerate(ctx.examples) if i != 5) < 80
    result = run_stage(ctx)
    assert result.cost["dropped_pairs"] == 1 and result.cost["examples_seen"] == 31


# ---------------------------------------------------------------- posttrain run


@pytest.mark.parametrize("method", ["sft", "dpo", "orpo"])
def test_diverging_stage_stops_run_exits_3_and_publishes_nothing(tmp_path, repo, poison, method):
    recipe = write_recipe(tmp_path, repo, RECIPE.replace("PIPELINES", PIPELINES[method]))
    cache, out = tmp_path / "cache", tmp_path / "run"
    poison(method, 3)
    result = invoke("run", recipe, "--out", out, "--cache", cache)

    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert (f"error: stage {method} (seed 0) diverged at step 3/4: the loss is nan (last finite loss "
            in result.output and "at step 2)" in result.output and f"stages.{method}.learning_rate" in result.output)
    published, partial = cache_entries(cache, method)
    assert published == [] and partial == []  # checkpoints 1 and 2 went with the attempt
    if method == "dpo":
        assert len(cache_entries(cache, "sft")[0]) == 1  # the finished upstream stage is kept
    failed = json.loads((out / "failed.json").read_text())
    assert (failed["stage"], failed["seed"], failed["step"], failed["reason"]) == (method, 0, 3, "the loss is nan")
    assert len(failed["key"]) == 64 and failed["message"] in result.output
    assert [row["step"] for row in failed["recent_steps"]] == [1, 2, 3] and failed["recent_steps"][-1]["loss"] == "nan"
    assert not (out / "results.jsonl").exists()

    plan = invoke("plan", recipe, "--cache", cache, "--json")
    statuses = {row["stage"]: row["status"] for row in json.loads(plan.output[plan.output.index("{"):])["stages"]}
    assert statuses[method] == "train"  # not resumed from the diverged attempt's checkpoints


def test_learning_rate_1000_explodes_finite_and_stops_the_run_at_step_2(tmp_path, repo):
    """The reviewer's run, for real: the loss went 4.59 -> 1.29e7 -> 1.2e6, then stayed at
    ln(vocab) with zero gradients, all finite; it was published with exit 0."""
    recipe = write_recipe(tmp_path, repo, RECIPE.replace("PIPELINES", PIPELINES["sft"]))
    cache, out = tmp_path / "cache", tmp_path / "run"
    result = invoke("run", recipe, "--out", out, "--cache", cache, "-o", "stages.sft.learning_rate=1000.0",
                    "-o", "stages.sft.logging_steps=1")
    assert result.exit_code == 3, result.output
    assert "error: stage sft (seed 0) diverged at step 2/4: the loss exploded to " in result.output
    failed = json.loads((out / "failed.json").read_text())
    assert failed["step"] == 2 and failed["recent_steps"][-1]["loss"] > 1e6
    assert cache_entries(cache, "sft") == ([], []) and not (out / "results.jsonl").exists()


def test_rerun_after_divergence_trains_afresh_and_clears_failed_json(tmp_path, repo, poison, monkeypatch):
    recipe = write_recipe(tmp_path, repo, RECIPE.replace("PIPELINES", PIPELINES["sft"]))
    cache, out = tmp_path / "cache", tmp_path / "run"
    poison("sft", 2)
    assert invoke("run", recipe, "--out", out, "--cache", cache).exit_code == 3
    assert (out / "failed.json").is_file()
    monkeypatch.undo()  # the cause is fixed

    result = invoke("run", recipe, "--out", out, "--cache", cache)
    assert result.exit_code == 0, result.output
    assert "  train  sft" in result.output and "resume" not in result.output
    assert not (out / "failed.json").exists()
    assert len(cache_entries(cache, "sft")[0]) == 1 and (out / "results.jsonl").is_file()


def test_the_stage_tracking_run_sees_the_failure(tmp_path, repo, poison, monkeypatch):
    from contextlib import contextmanager

    from posttrain.tracking import Tracker

    ended = []

    @contextmanager
    def stage(self, name, method, seed, config):
        try:
            yield []
        except BaseException as exc:
            ended.append((name, type(exc).__name__))
            raise
        ended.append((name, None))

    monkeypatch.setattr(Tracker, "stage", stage)  # Tracker.stage marks its W&B run failed on an exception
    recipe = write_recipe(tmp_path, repo, RECIPE.replace("PIPELINES", PIPELINES["orpo"]))
    poison("orpo", 1)
    result = invoke("run", recipe, "--out", tmp_path / "run", "--cache", tmp_path / "cache")
    assert result.exit_code == 3 and "diverged at step 1/4: the loss is nan (no finite loss before it)" in result.output
    assert ended == [("orpo", "TrainingDiverged")]
