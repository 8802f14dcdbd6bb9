"""Sharding presets: `distributed.strategy` (auto | ddp | fsdp2 | zero2 | zero3) built on the
accelerate configs TRL ships, the `auto` rule, the strategy in effect under any launcher
(TrainingArguments fields), refusals of combinations known to fail, and plan's disk estimate."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from posttrain.checks import sharding_problems
from posttrain.cli import main
from posttrain.distributed import (ModelSize, accelerate_config, choose_strategy, config_strategy,
                                   deepspeed_config, fsdp2_config, launcher_problem, launcher_strategy,
                                   strategy_trainer_kwargs, trl_accelerate_config)
from posttrain.recipe.load import validate_recipe
from tiny_recipes import TINY, write_recipe

REPO = Path(__file__).resolve().parent.parent
TRL_CONFIGS = Path(__import__("trl").__file__).parent / "accelerate_configs"
OURS = {"num_processes", "mixed_precision", "use_cpu"}   # what accelerate_config sets explicitly


@pytest.mark.parametrize("strategy, shipped", [("ddp", "multi_gpu.yaml"), ("fsdp2", "fsdp2.yaml"),
                                               ("zero2", "zero2.yaml"), ("zero3", "zero3.yaml")])
def test_generated_accelerate_config_is_trls_file_plus_our_values(strategy, shipped):
    trl = yaml.safe_load((TRL_CONFIGS / shipped).read_text())
    ours = accelerate_config(strategy, 4)
    assert (ours["num_processes"], ours["mixed_precision"], ours["use_cpu"]) == (4, "no", False)
    if strategy == "fsdp2":   # every rank builds the model: no rank-0-only loading
        assert ours["fsdp_config"].pop("fsdp_cpu_ram_efficient_loading") is False
        trl["fsdp_config"].pop("fsdp_cpu_ram_efficient_loading")
    assert {k: v for k, v in ours.items() if k not in OURS} == {k: v for k, v in trl.items() if k not in OURS}
    assert config_strategy(ours) == strategy
    assert config_strategy(accelerate_config(strategy, 1)) == "single"
    assert config_strategy(accelerate_config("auto", 4)) == "ddp"   # each stage's strategy: its TrainingArguments


def test_fsdp2_trainer_config_is_trls_with_checkpointing_as_resolved():
    shipped = trl_accelerate_config("fsdp2")["fsdp_config"]
    ours = fsdp2_config(gradient_checkpointing=True)
    assert ours == {"version": 2, "auto_wrap_policy": shipped["fsdp_auto_wrap_policy"],
                    "reshard_after_forward": shipped["fsdp_reshard_after_forward"],
                    "state_dict_type": shipped["fsdp_state_dict_type"], "cpu_offload": shipped["fsdp_offload_params"],
                    "activation_checkpointing": True, "cpu_ram_efficient_loading": False}
    assert strategy_trainer_kwargs("fsdp2") == {"fsdp": True, "fsdp_config": fsdp2_config(False)}
    assert strategy_trainer_kwargs("ddp") == strategy_trainer_kwargs("single") == {}


@pytest.mark.parametrize("strategy, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_config_is_trls_stage_with_batch_and_precision_left_to_the_trainer(strategy, stage):
    config = deepspeed_config(strategy)
    zero = config["zero_optimization"]
    shipped = trl_accelerate_config(strategy)["deepspeed_config"]
    assert zero["stage"] == stage == shipped["zero_stage"]
    assert zero["offload_optimizer"]["device"] == shipped["offload_optimizer_device"] == "none"
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto", key   # transformers fills them: the global batch stays posttrain's
    assert config["bf16"] == config["fp16"] == {"enabled": "auto"}
    json.dumps(config, allow_nan=False)   # a plain JSON config
    assert strategy_trainer_kwargs(strategy) == {"deepspeed": config}


B = 1_000_000_000


@pytest.mark.parametrize("requested, params, trainable, world, memory, expected", [
    ("auto", 8 * B, 8 * B, 1, 80, "single"),          # one process
    ("fsdp2", 8 * B, 8 * B, 1, 80, "single"),
    ("auto", 1 * B, 1 * B, 8, None, "ddp"),           # CPU processes
    ("auto", int(0.5 * B), int(0.5 * B), 8, 80, "ddp"),   # 8 GB of state fits in 64 GB
    ("auto", 4 * B, 4 * B, 8, 80, "ddp"),             # 64 GB: just fits 80% of 80 GB
    ("auto", 5 * B, 5 * B, 8, 80, "fsdp2"),           # 80 GB does not
    ("auto", 4 * B, 4 * B, 8, 40, "fsdp2"),
    ("auto", 8 * B, 8 * B, 8, 80, "fsdp2"),           # an 8B full fine-tune: 128 GB
    ("auto", 8 * B, 40_000_000, 8, 80, "ddp"),        # 8B with LoRA: 16 GB frozen + 0.6 GB
    ("auto", 32 * B, 40_000_000, 8, 80, "fsdp2"),     # 64 GB frozen + adapter > 64 GB
    ("zero3", int(0.5 * B), int(0.5 * B), 8, 80, "zero3"),   # a named strategy is used as it is
])
def test_auto_picks_by_the_documented_rule(requested, params, trainable, world, memory, expected):
    strategy, why = choose_strategy(requested, ModelSize(params, trainable), world, memory)
    assert strategy == expected, why


def test_launcher_mixed_precision_is_refused(tmp_path, monkeypatch):
    """transformers takes ACCELERATE_MIXED_PRECISION for a stage with bf16=False: a float32
    stage would silently train in bf16 autocast under TRL's shipped configs."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert "mixed_precision bf16" in messages(sharding_problems(tiny(tmp_path), tmp_path, 1))["model.dtype"]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert not sharding_problems(tiny(tmp_path), tmp_path, 1)


def test_launcher_config_is_followed_by_auto_and_refused_when_it_differs():
    fsdp = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    assert launcher_strategy(fsdp) == "fsdp2"
    assert launcher_strategy({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}) == "zero3"
    assert launcher_strategy({}) is None                      # torchrun
    assert launcher_problem("auto", "fsdp2") is None and launcher_problem("fsdp2", "fsdp2") is None
    message = launcher_problem("ddp", "fsdp2")
    assert "asks for ddp" in message and "runs fsdp2" in message


def tiny(tmp_path, **changes):
    """The tiny recipe as a validated Recipe, with `changes` (dotted keys) applied."""
    raw = yaml.safe_load(TINY.replace("{repo}", str(REPO)))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return validate_recipe(raw, "tiny.yaml")


def messages(problems):
    return {".".join(map(str, loc)): message for loc, message in problems}


def test_known_bad_combinations_are_refused_with_the_reason(tmp_path):
    recipe = tiny(tmp_path, **{"distributed.strategy": "zero3", "model.lora": {"r": 4},
                              "stages.sft.gradient_checkpointing": True,
                              "stages.dpo.trainer": {"padding_free": True}})
    found = messages(sharding_problems(recipe, tmp_path, world_size=2))
    assert "non-reentrant" in found["stages.sft.gradient_checkpointing"]
    assert "no-op" in found["stages.dpo.trainer.padding_free"]
    assert "pip install 'posttrain[deepspeed]'" in found["distributed.strategy"]
    # one process: no strategy applies, so nothing strategy-dependent is refused
    assert set(messages(sharding_problems(recipe, tmp_path, world_size=1))) == {"stages.dpo.trainer.padding_free"}


def test_liger_dpo_under_fsdp2_and_qlora_sharded_are_refused(tmp_path):
    recipe = tiny(tmp_path, **{"distributed.strategy": "fsdp2", "stages.dpo.use_liger_kernel": True})
    found = messages(sharding_problems(recipe, tmp_path, world_size=2))
    assert "FSDP2" in found["stages.dpo.use_liger_kernel"] or "liger-kernel" in found["stages.dpo.use_liger_kernel"]
    recipe = tiny(tmp_path, **{"distributed.strategy": "fsdp2", "model.lora": {"r": 4},
                              "model.quantization": {"bits": 4}})
    assert "QLoRA under fsdp2" in messages(sharding_problems(recipe, tmp_path, world_size=2))["model.quantization"]


@pytest.mark.parametrize("strategy", ["fsdp2", "zero2", "zero3"])
def test_sharded_strategies_are_refused_on_cpu_processes(tmp_path, strategy):
    recipe = tiny(tmp_path, **{"distributed.strategy": strategy})
    found = messages(sharding_problems(recipe, tmp_path, world_size=2, device="cpu"))
    assert "needs CUDA GPUs" in found["distributed.strategy"] or "DeepSpeed" in found["distributed.strategy"]
    assert not sharding_problems(tiny(tmp_path, **{"distributed.strategy": "ddp"}), tmp_path, 2, "cpu")


def test_accelerate_config_file_must_exist_and_agree(tmp_path):
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(accelerate_config("fsdp2", 2)))
    recipe = tiny(tmp_path, **{"distributed.strategy": "ddp", "distributed.accelerate_config": "fsdp.yaml"})
    assert "runs fsdp2 but distributed.strategy is ddp" in messages(
        sharding_problems(recipe, tmp_path, 2))["distributed.accelerate_config"]
    (tmp_path / "trl.yaml").write_text((TRL_CONFIGS / "fsdp2.yaml").read_text())   # mixed_precision: bf16
    recipe = tiny(tmp_path, **{"distributed.accelerate_config": "trl.yaml"})
    assert "sets mixed_precision bf16" in messages(sharding_problems(recipe, tmp_path, 2))["distributed.accelerate_config"]
    recipe = tiny(tmp_path, **{"distributed.accelerate_config": "missing.yaml"})
    assert "cannot read" in messages(sharding_problems(recipe, tmp_path, 1))["distributed.accelerate_config"]


def test_validate_refuses_under_the_recipe_key(tmp_path):
    path = write_recipe(tmp_path, REPO, TINY + "distributed: {strategy: zero3}\n")
    result = CliRunner().invoke(main, ["validate", str(path), "--world-size", "2",
                                       "-o", "stages.dpo.trainer.padding_free=true"])
    assert result.exit_code == 2
    assert "distributed.strategy" in result.output and "stages.dpo.trainer.padding_free" in result.output


# ---------------------------------------------------------------- plan for a machine you are not on

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072)


@pytest.fixture(scope="module")
def hub_8b(tmp_path_factory):
    """meta-llama/Llama-3.1-8B as its config (8.03B parameters, counted on the meta device) and a
    tiny tokenizer, no weights, in a hub cache of this module's own; the example's data as local folders."""
    from huggingface_hub import constants
    from hub_fixtures import COMMIT, bpe_tokenizer, ultrachat_folder, ultrafeedback_folder
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("hub8b")
    patch = pytest.MonkeyPatch()
    patch.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
    folder = root / "hub" / "models--meta-llama--Llama-3.1-8B"
    snapshot = folder / "snapshots" / COMMIT
    tokenizer = bpe_tokenizer("llama3")
    LlamaConfig(**LLAMA_8B, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id).save_pretrained(
        snapshot)
    tokenizer.save_pretrained(snapshot)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    yield {"root": root, "ultrachat": ultrachat_folder(root, n=64), "ultrafeedback": ultrafeedback_folder(root, n=64)}
    patch.undo()


def plan_8b(hub, *extra):
    from test_recipes_examples import offline_overrides

    path = REPO / "recipes" / "examples" / "llama-3.1-8b-lora.yaml"
    args = ["plan", str(path), "--json", "--cache", str(hub["root"] / "cache"), *offline_overrides(path, hub),
            "-o", "tracking.tensorboard=false", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    planned = json.loads(result.stdout)
    rows = {row["stage"]: row for row in planned["stages"]}
    # the total: every stage's model, plus the largest one stage's checkpoints at a time
    assert planned["disk"]["models_bytes"] == sum(row["disk"]["model_bytes"] for row in rows.values())
    assert planned["disk"]["total_bytes"] == planned["disk"]["models_bytes"] + max(
        row["disk"]["peak_bytes"] - row["disk"]["model_bytes"] for row in rows.values())
    return rows


def test_plan_for_8_gpus_of_80_gb_picks_by_size_and_estimates_disk(hub_8b):
    lora = plan_8b(hub_8b, "--world-size", "8", "--gpu-memory", "80")
    assert {row["strategy"] for row in lora.values()} == {"ddp"}   # 16 GB frozen bf16 weights + adapter
    assert {row["device"] for row in lora.values()} == {"cuda"}
    assert lora["sft"]["attn_implementation"] == "sdpa"            # the recipe's
    adapter = lora["sft"]["disk"]
    assert adapter["model_bytes"] < 0.5e9                          # LoRA: the adapter only

    full = plan_8b(hub_8b, "--world-size", "8", "--gpu-memory", "80", "-o", "model.lora=null")
    sft = full["sft"]
    assert sft["strategy"] == "fsdp2" and "exceeds 80% of 80 GB" in sft["strategy_why"]
    disk = sft["disk"]   # ~16 GB of bf16 weights, + ~64 GB of AdamW moments per checkpoint, 2 kept
    assert 16.0e9 < disk["model_bytes"] < 16.1e9
    assert disk["checkpoint_bytes"] - disk["model_bytes"] == 8 * disk["model_bytes"] // 2
    assert disk["checkpoints"] == 2
    assert disk["peak_bytes"] == disk["model_bytes"] + 2 * disk["checkpoint_bytes"]
    # a sharded 8B full fine-tune at batch 4 x 2048 tokens: activations need checkpointing on 80 GB
    assert sft["memory_gb"] is not None

    one = plan_8b(hub_8b, "--world-size", "1", "--gpu-memory", "80", "-o", "model.lora=null")
    assert one["sft"]["strategy"] == "single"
    assert one["sft"]["gradient_checkpointing"] is True    # the recipe asks for it


def test_launch_config_is_the_recipes_file_or_the_strategys(tmp_path):
    from posttrain.distributed import launch_config

    assert launch_config(tiny(tmp_path, **{"distributed.strategy": "fsdp2"}), tmp_path, 4) == accelerate_config("fsdp2", 4)
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**accelerate_config("ddp", 2), "gpu_ids": "0,1,2,3"}))
    mine = launch_config(tiny(tmp_path, **{"distributed.accelerate_config": "mine.yaml"}), tmp_path, 4)
    assert (mine["num_processes"], mine["gpu_ids"]) == (4, "0,1,2,3")


def test_plan_refuses_fsdp2_on_cpu_processes_and_plans_it_for_gpus(tmp_path):
    path = write_recipe(tmp_path, REPO, TINY + "distributed: {strategy: fsdp2}\n")
    cache = ["--cache", str(tmp_path / "cache"), "-o", "pipelines={sft: [sft]}"]
    assert CliRunner().invoke(main, ["validate", str(path), "--world-size", "2"]).exit_code == 0   # device unknown
    refused = CliRunner().invoke(main, ["plan", str(path), "--world-size", "2", "--device", "cpu", *cache])
    assert refused.exit_code == 2 and "distributed.strategy: fsdp2: FSDP2 needs CUDA GPUs" in refused.output
    planned = CliRunner().invoke(main, ["plan", str(path), "--json", "--world-size", "2", "--gpu-memory", "80", *cache])
    assert planned.exit_code == 0, planned.output
    (row,) = json.loads(planned.stdout)["stages"]
    assert (row["strategy"], row["device"], row["dataloader_pin_memory"]) == ("fsdp2", "cuda", True)


def test_a_model_that_cannot_be_counted_plans_with_an_unknown_disk(tmp_path, monkeypatch):
    import posttrain.models
    from posttrain.errors import ModelError

    def refuse(*args, **kwargs):
        raise ModelError("no meta model for this architecture")

    monkeypatch.setattr(posttrain.models, "model_size", refuse)
    path = write_recipe(tmp_path, REPO)
    args = ["plan", str(path), "--cache", str(tmp_path / "cache"), "-o", "pipelines={sft: [sft]}"]
    result = CliRunner().invoke(main, [*args, "--gpu-memory", "80", "--world-size", "2"])
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()[:2]
    assert header.split()[-1] == "disk" and row.split()[-1] == "?"
    assert "the model's size could not be counted" in result.stdout


def test_auto_plans_the_strategy_of_the_recipes_accelerate_config(tmp_path):
    """`run --gpus N` launches with the recipe's accelerate config: with `auto`, plan (and the
    trainer's arguments) follow its strategy, as the processes will run (found by QA: plan said ddp)."""
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(accelerate_config("fsdp2", 2)))
    path = write_recipe(tmp_path, REPO, TINY + "distributed: {accelerate_config: fsdp.yaml}\n")
    cache = ["--cache", str(tmp_path / "cache"), "-o", "pipelines={sft: [sft]}"]
    planned = CliRunner().invoke(main, ["plan", str(path), "--json", "--world-size", "2", "--gpu-memory", "80", *cache])
    assert planned.exit_code == 0, planned.output
    (row,) = json.loads(planned.stdout)["stages"]
    assert row["strategy"] == "fsdp2" and "accelerate_config" in row["strategy_why"]
    # ... and its TrainingArguments name FSDP themselves (under torchrun no launcher sets it up).
    from posttrain.stages.common import strategy_kwargs

    assert strategy_kwargs(row, False).get("fsdp")
