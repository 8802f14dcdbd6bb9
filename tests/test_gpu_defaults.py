"""GPU defaults resolved in one place (posttrain.defaults): given the device's facts (injected
here: no GPU needed), bf16, attention kernel, gradient checkpointing by the memory estimate,
pinned loaders and the strategy; a recipe setting wins; on CPU nothing changes (keys and the
TrainingArguments posttrain passed before)."""

from pathlib import Path

import pytest
import yaml

from posttrain.defaults import Machine, memory_estimate, resolve_stage
from posttrain.distributed import BatchLayout, ModelSize
from posttrain.models import ModelSource
from posttrain.recipe.fields import LoraSpec
from posttrain.recipe.load import validate_recipe
from posttrain.recipe.schema import ModelSpec
from posttrain.stages.common import StageContext, trainer_kwargs
from posttrain.stages.sft import SFTStage

REPO = Path(__file__).resolve().parent.parent
H100 = Machine("cuda", gpus=8, gpu_memory_gb=80, gpu_name="H100", bf16=True)
V100 = Machine("cuda", gpus=1, gpu_memory_gb=32, gpu_name="V100", bf16=False)
CPU = Machine("cpu")
HALF_B = ModelSize(500_000_000, 500_000_000, hidden=896, layers=24)
EIGHT_B = ModelSize(8_030_000_000, 8_030_000_000, hidden=4096, layers=32)


def sft(**settings):
    return SFTStage(method="sft", data="d", learning_rate=1e-3, batch_size=8, max_length=1024, **settings)


def resolve(facts, size=HALF_B, world=1, dtype="auto", attn=None, lora=None, **settings):
    layout = BatchLayout(world, 8 // world, 1)
    model = ModelSpec(name="org/model", dtype=dtype, attn_implementation=attn)
    return resolve_stage(sft(**settings), lora, model, "auto", layout, facts, size)


def test_cuda_with_bf16_and_flash_attention():
    got = resolve(Machine(**{**H100.as_dict(), "flash_attn": True}))
    assert (got["precision"], got["bf16"], got["attn_implementation"]) == ("bfloat16", True, "flash_attention_2")
    assert got["dataloader_pin_memory"] is True and got["dataloader_num_workers"] == 0
    assert got["gradient_checkpointing"] is False and "fits" in got["gradient_checkpointing_why"]


def test_cuda_without_flash_attention_uses_sdpa_and_without_bf16_float32():
    assert resolve(H100)["attn_implementation"] == "sdpa"
    old = resolve(V100)
    assert (old["precision"], old["bf16"]) == ("float32", False)
    assert resolve(V100, dtype="bfloat16")["precision"] == "bfloat16"   # an explicit dtype is itself


def test_gradient_checkpointing_turns_on_when_the_estimate_needs_it():
    big = resolve(H100, size=EIGHT_B, world=8)   # 8B full: fsdp2, 16 GB state a GPU + activations of 1 x 1024
    assert big["strategy"] == "fsdp2"
    expected = memory_estimate(EIGHT_B, "fsdp2", 8, 1, 1024)
    assert big["memory_gb"] == round(expected / 1e9, 2)
    assert big["gradient_checkpointing"] is (expected > 0.8 * 80e9)
    one = resolve(H100, size=EIGHT_B, world=1)   # one GPU: 128 GB of state does not fit
    assert one["gradient_checkpointing"] is True and "exceeds" in one["gradient_checkpointing_why"]


def test_a_recipe_setting_wins():
    got = resolve(H100, size=EIGHT_B, world=1, attn="eager", gradient_checkpointing=False, use_liger_kernel=True)
    assert got["attn_implementation"] == "eager"
    assert got["gradient_checkpointing"] is False and got["gradient_checkpointing_why"] == "the stage's gradient_checkpointing"
    assert got["use_liger_kernel"] is True


def test_lora_counts_frozen_weights_and_never_checkpoints_under_zero3():
    lora = LoraSpec(r=16)
    size = ModelSize(EIGHT_B.params, 40_000_000, EIGHT_B.hidden, EIGHT_B.layers)
    layout = BatchLayout(8, 1, 1)
    model = ModelSpec(name="org/model", dtype="bfloat16")
    got = resolve_stage(sft(), lora, model, "zero3", layout, H100, size)
    assert got["strategy"] == "zero3" and got["gradient_checkpointing"] is False


def test_cpu_changes_nothing():
    got = resolve(CPU, size=None, world=2)
    assert got == {**got, "strategy": "ddp", "precision": "float32", "bf16": False, "device": "cpu",
                   "attn_implementation": None, "gradient_checkpointing": False, "memory_gb": None,
                   "use_liger_kernel": False, "dataloader_pin_memory": False, "dataloader_num_workers": 0}


MICRO = ModelSource(name="builtin:micro-llama")


def test_cpu_trainer_settings_are_the_ones_passed_before(tmp_path):
    ctx = StageContext(name="sft", spec=sft(), seed=0, start=MICRO, examples=[], out_dir=tmp_path)
    kwargs = trainer_kwargs(ctx)
    assert not {"fsdp", "fsdp_config", "deepspeed"} & set(kwargs)
    checkpointing = kwargs.get("activation_checkpointing", kwargs.get("gradient_checkpointing"))
    assert checkpointing is False and kwargs["bf16"] is False and kwargs["use_cpu"] is True
    assert kwargs["dataloader_num_workers"] == 0 and kwargs["use_liger_kernel"] is False


def test_fsdp2_reaches_the_training_arguments(tmp_path):
    """The TrainingArguments route (works under torchrun too): fsdp2 resolved -> fsdp_plugin_args
    of FSDP version 2 with TRL's wrap policy; the checkpointing flag moves to FSDP's own."""
    from trl import SFTConfig

    ctx = StageContext(name="sft", spec=sft(gradient_checkpointing=True), seed=0, start=MICRO, examples=[],
                       out_dir=tmp_path)
    ctx.resolved = {**resolve(CPU, size=None), "strategy": "fsdp2", "strategy_why": "test",
                    "gradient_checkpointing": True}
    kwargs = trainer_kwargs(ctx)
    assert kwargs["fsdp"] is True and kwargs["fsdp_config"]["activation_checkpointing"] is True
    assert kwargs.get("activation_checkpointing", kwargs.get("gradient_checkpointing")) is False
    args = SFTConfig(**kwargs)
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    ctx.resolved["strategy_why"] = "auto: the launcher's accelerate config"   # the launcher's config rules
    assert "fsdp" not in trainer_kwargs(ctx)


def test_dpo_under_fsdp2_gets_a_reference_for_precomputed_log_probs(tmp_path):
    from posttrain.stages.common import start_with_reference
    from posttrain.stages.dpo import DPOStage

    spec = DPOStage(method="dpo", data="d", learning_rate=1e-3, precompute_ref_log_probs=True)
    ctx = StageContext(name="dpo", spec=spec, seed=0, start=MICRO, examples=[], out_dir=tmp_path)
    ctx.resolved = {**resolve(CPU, size=None), "strategy": "ddp"}
    assert start_with_reference(ctx)[3] is None          # precomputed: no reference kept
    ctx.resolved["strategy"] = "fsdp2"                    # TRL scores with one before sharding
    assert start_with_reference(ctx)[3] is not None


QUICKSTART = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())


def test_cpu_stage_keys_did_not_move():
    """The new settings stay out of every key at their defaults (and `gradient_checkpointing:
    false` keys as unset, as when false was the default), so the quickstart's keys are those
    main computed (measured: 340b34a38c6d, 3d797465ace7, a5ca4aa9f0ce before and after)."""
    recipe = validate_recipe(QUICKSTART, "quickstart.yaml")
    for stage in recipe.stages.values():
        settings = stage.key_settings()
        assert "gradient_checkpointing" not in settings and "use_liger_kernel" not in settings
        assert stage.model_copy(update={"gradient_checkpointing": False}).key_settings() == settings
        assert stage.model_copy(update={"gradient_checkpointing": True}).key_settings() != settings
    assert "distributed" in type(recipe).model_fields


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_gpu_defaults_are_in_no_key_but_precision_is(tmp_path, device):
    """Keys of an explicit-dtype recipe are the same planned for CPU or a GPU (attention,
    checkpointing, loaders, strategy are not in them); with dtype auto the precision is."""
    from posttrain.plan import make_plan
    from tiny_recipes import TINY

    raw = yaml.safe_load(TINY.replace("{repo}", str(REPO)))
    keys = {}
    for dtype in ("float32", "auto"):
        recipe = validate_recipe({**raw, "model": {**raw["model"], "dtype": dtype}}, "tiny.yaml")
        keys[dtype] = {plan_device: list(make_plan(recipe, tmp_path, device=plan_device).nodes)
                       for plan_device in ("cpu", device)}
    assert keys["float32"]["cpu"] == keys["float32"][device]
    assert (keys["auto"]["cpu"] == keys["auto"][device]) is (device == "cpu")
