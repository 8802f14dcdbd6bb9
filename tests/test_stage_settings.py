"""The settings real recipes use (gradient checkpointing, warmup steps, optimizer, packing,
held-out loss, attention implementation, checkpoints kept) and the checked passthrough to
the method's TRL config (`trainer:`)."""

import json

import pytest
from click.testing import CliRunner

from posttrain.cli import main
from posttrain.data.builtin import instruction_rows
from posttrain.models import ModelSource
from posttrain.stages.common import StageContext
from tiny_recipes import write_recipe

MICRO = ModelSource(name="builtin:micro-llama")


def test_the_optimizer_names_are_transformers_own():
    from transformers.training_args import OptimizerNames

    from posttrain.recipe.fields import OPTIMIZERS

    assert list(OPTIMIZERS) == [name.value for name in OptimizerNames]


def sft_args(tmp_path, **settings):
    from posttrain.stages.sft import SFTStage, build_trainer

    spec = SFTStage(method="sft", data="d", learning_rate=1e-3, max_steps=1, batch_size=4, max_length=64, **settings)
    rows = instruction_rows("train", 8, seed=0)
    trainer, _ = build_trainer(StageContext(name="sft", spec=spec, seed=0, start=MICRO, examples=rows,
                                            out_dir=tmp_path))
    return trainer.args


def test_named_settings_and_the_passthrough_reach_the_trl_config(tmp_path):
    args = sft_args(tmp_path, gradient_checkpointing=True, warmup_steps=3, optim="adafactor", packing=True,
                    dataset_num_proc=1, trainer={"neftune_noise_alpha": 5.0, "lr_scheduler_kwargs": {"power": 2.0}})
    checkpointing = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    assert checkpointing is True and args.warmup_steps == 3 and args.optim == "adafactor" and args.packing
    assert args.dataset_num_proc == 1 and args.neftune_noise_alpha == 5.0 and args.lr_scheduler_kwargs == {"power": 2.0}
    plain = sft_args(tmp_path / "plain")
    assert not (getattr(plain, "activation_checkpointing", None) or plain.gradient_checkpointing)
    assert plain.optim == "adamw_torch" and not plain.packing and plain.neftune_noise_alpha is None


PASSTHROUGH = """
name: passthrough
model: {name: builtin:micro-llama}
data:
  ins: {source: builtin:skills, limit: 16}
  prefs: {source: builtin:skills-preferences, limit: 16}
stages:
  sft: {method: sft, data: ins, learning_rate: 1.0e-3, max_steps: 1, batch_size: 8, max_length: 96, SFT_TRAINER}
  dpo: {method: dpo, data: prefs, learning_rate: 1.0e-3, max_steps: 1, batch_size: 8, max_length: 96, DPO_TRAINER}
pipelines:
  sft+dpo: [sft, dpo]
eval:
  tasks: [{repo}/evals/skills_exact.yaml]
  limit: 2
"""


def plan(tmp_path, repo, sft="trainer: {}", dpo="trainer: {}"):
    path = write_recipe(tmp_path, repo, PASSTHROUGH.replace("SFT_TRAINER", sft).replace("DPO_TRAINER", dpo))
    return CliRunner().invoke(main, ["plan", str(path)])


@pytest.mark.parametrize("setting, message", [
    ("trainer: {neftune_noise_alfa: 5}", "stages.sft.trainer.neftune_noise_alfa: not a field of the method's TRL "
                                         "config; did you mean 'neftune_noise_alpha'? (SFTConfig)"),
    ("trainer: {num_train_epochs: 3}", "stages.sft.trainer.num_train_epochs: a recipe setting: epochs (SFTConfig)"),
    ("trainer: {max_length: 64}", "stages.sft.trainer.max_length: a recipe setting: write it as max_length beside "
                                  "the stage's other settings (SFTConfig)"),
    ("trainer: {output_dir: /tmp/elsewhere}", "stages.sft.trainer.output_dir: posttrain sets it (each stage trains "
                                              "in its own cache folder) (SFTConfig)"),
    ("trainer: {push_to_hub: true}", "stages.sft.trainer.push_to_hub: a recipe setting: posttrain export "
                                     "--push-to-hub (SFTConfig)"),
    ("trainer: {torch_empty_cache_steps: 0}", "stages.sft.trainer: SFTConfig refuses these values: ValueError: "
                                              "`torch_empty_cache_steps` must be an integer bigger than 0, got 0."),
    ("optim: paged_adamw_8bit", "stages.sft.optim: paged_adamw_8bit needs bitsandbytes"),
    # TRL's configs do not check types: this trained, then failed as a traceback in NEFTune's hook.
    ("trainer: {neftune_noise_alpha: 1e-5}", "stages.sft.trainer.neftune_noise_alpha: expects float | None, got "
                                             "str '1e-5' (YAML reads 1e-5 as text: write 1.0e-5) (SFTConfig)"),
])
def test_a_passthrough_key_that_is_not_a_free_trl_field_fails_before_training(tmp_path, repo, isolated_cache,
                                                                              setting, message):
    import importlib.util

    if "bitsandbytes" in message and importlib.util.find_spec("bitsandbytes"):
        pytest.skip("bitsandbytes is installed")
    result = plan(tmp_path, repo, sft=setting)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_passthrough_values_are_checked_against_the_config_fields_types():
    from trl import DPOConfig, SFTConfig

    from posttrain.checks import _passthrough_type_problems

    assert _passthrough_type_problems(SFTConfig, {
        "neftune_noise_alpha": 5, "lr_scheduler_kwargs": {"min_lr": 1e-5}, "eval_on_start": True,
        "logging_strategy": "steps", "packing_strategy": "bfd", "eval_packing": None}) == []
    assert _passthrough_type_problems(SFTConfig, {"neftune_noise_alpha": "five", "eval_on_start": "yes",
                                                  "torch_empty_cache_steps": 2.5, "logging_strategy": "often"}) == [
        ("neftune_noise_alpha", "expects float | None, got str 'five'"),
        ("eval_on_start", "expects bool, got str 'yes'"),
        ("torch_empty_cache_steps", "expects int | None, got float 2.5")]
    assert _passthrough_type_problems(DPOConfig, {"use_weighting": 1}) == [("use_weighting", "expects bool, got int 1")]


def test_a_dpo_passthrough_names_dpos_own_settings(tmp_path, repo):
    result = plan(tmp_path, repo, dpo="trainer: {beta: 0.5, ld_alpha: 0.5, use_weighting: true}")
    assert result.exit_code == 2, result.output
    assert "stages.dpo.trainer.beta: a recipe setting: write it as beta" in result.output
    assert "ld_alpha" not in result.output and "use_weighting" not in result.output   # free DPOConfig fields


@pytest.mark.parametrize("text, message", [
    ("warmup_steps: 2, warmup_ratio: 0.1", "give warmup_steps or warmup_ratio, not both"),
    ("eval_steps: 2", "eval_steps needs eval_data"),
    ("eval_data: nope", "stages.sft.eval_data: unknown dataset 'nope'"),
    ("optim: adamw", "stages.sft.optim: must be one of"),
    # TRL 1.16 raises at trainer build otherwise (found by running it: a traceback, not a message)
    ("padding_free: true", "stages.sft: padding_free needs packing: true"),
])
def test_inconsistent_settings_are_refused_at_validate(tmp_path, repo, text, message):
    path = write_recipe(tmp_path, repo, PASSTHROUGH.replace("SFT_TRAINER", text).replace("DPO_TRAINER", "seed: 0"))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and message in result.output, result.output


def test_held_out_loss_is_measured_during_and_after_training(tmp_path, repo):
    text = PASSTHROUGH.replace(
        "  prefs: {source: builtin:skills-preferences, limit: 16}",
        "  prefs: {source: builtin:skills-preferences, limit: 16}\n  held: {source: builtin:skills, split: test, limit: 8}")
    text = text.replace("max_steps: 1, batch_size: 8, max_length: 96, SFT_TRAINER",
                        "max_steps: 2, batch_size: 8, max_length: 96, eval_data: held, eval_steps: 1")
    text = text.replace(", DPO_TRAINER", "").replace("sft+dpo: [sft, dpo]", "sft: [sft]")
    path = write_recipe(tmp_path, repo, text)
    cache = tmp_path / "cache"
    result = CliRunner().invoke(main, ["run", str(path), "--cache", str(cache), "--out", str(tmp_path / "run"),
                                       "--no-wandb"])
    assert result.exit_code == 0, result.output
    stage = next((cache / "stages").glob("*/stage.json")).parent
    log = [json.loads(line) for line in (stage / "trainer_log.jsonl").read_text().splitlines()]
    evals = [entry for entry in log if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [1, 2, 2]   # every step, then once at the end
    record = json.loads((stage / "stage.json").read_text())
    assert record["metrics"]["eval_loss"] == evals[-1]["eval_loss"]
    assert record["key_inputs"]["eval_data"]   # the held-out rows' fingerprint is in the key


def test_attn_implementation_and_checkpoints_kept_reach_model_and_trainer(tmp_path):
    from dataclasses import replace

    from posttrain.models import load_model
    from posttrain.stages.common import CheckpointPolicy, trainer_kwargs
    from posttrain.stages.sft import SFTStage

    loaded = load_model(replace(MICRO, attn_implementation="eager"))
    assert loaded.model.config._attn_implementation == "eager"
    spec = SFTStage(method="sft", data="d", learning_rate=1e-3)
    ctx = StageContext(name="sft", spec=spec, seed=0, start=MICRO, examples=[], out_dir=tmp_path,
                       checkpoint=CheckpointPolicy(keep=5))
    assert trainer_kwargs(ctx)["save_total_limit"] == 5


def test_tensorboard_without_its_writer_is_refused_before_training(tmp_path, repo, isolated_cache):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed")
    path = write_recipe(tmp_path, repo, PASSTHROUGH.replace("SFT_TRAINER", "seed: 0").replace("DPO_TRAINER", "seed: 0")
                        + "tracking: {tensorboard: true}\n")
    result = CliRunner().invoke(main, ["plan", str(path)])
    assert result.exit_code == 2 and "tracking.tensorboard: needs TensorBoard's writer: pip install tensorboard" \
        in result.output, result.output


def test_sft_packing_trains_and_counts_conversations_not_packed_rows(tmp_path):
    """Packed rows (TRL's best-fit packing) hold several conversations and no `messages`:
    the stage finishes (it crashed counting cut rows), and stage.json counts conversations
    (else the report said packed conversations were dropped). Lengths as in test_estimate:
    36, 126, 81, 64, 63, 85 and 71 tokens, each cut to 64 before packing."""
    from test_estimate import MAX_LENGTH, method_rows

    from posttrain.stages import run_stage
    from posttrain.stages.sft import SFTStage

    rows = method_rows("sft")
    spec = SFTStage(method="sft", data="d", learning_rate=1e-3, epochs=1, batch_size=2, max_length=MAX_LENGTH,
                    packing=True)
    (tmp_path / "stage").mkdir()
    cost = run_stage(StageContext(name="stage", spec=spec, seed=0, start=MICRO, examples=rows,
                                  out_dir=tmp_path / "stage")).cost
    assert (cost["rows_given"], cost["rows_trained"], cost["examples_seen"]) == (7, 7, 7)
    assert cost["train_tokens"] == 36 + 64 * 4 + 63 + 64
    # The conversations that fill a row alone: the four cut ones and the one exactly 64 long.
    assert cost["rows_truncated"] == 5
    assert cost["optimizer_steps"] == 4   # no two conversations share a 64-token row: 7 rows, batches of 2
    from posttrain.estimate import EpochSize, estimate_stage

    # plan packs the tokens into rows of max_length: 419 tokens -> 7 rows -> 4 steps, as trained
    assert estimate_stage(spec, EpochSize(rows=7, dropped=0, truncated=5, tokens=419)).steps == 4
