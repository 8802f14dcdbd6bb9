"""QLoRA (model.quantization): 4-bit base weights need LoRA, bitsandbytes and a CUDA GPU;
refused before training, with the place and what to do, where any is missing."""

import pytest
from click.testing import CliRunner

from posttrain.cli import main
from tiny_recipes import write_recipe

QLORA = """
name: qlora
model:
  name: builtin:micro-llama
  quantization: {bits: 4, quant_type: nf4}
  LORA
data:
  ins: {source: builtin:skills, limit: 16}
stages:
  sft: {method: sft, data: ins, learning_rate: 1.0e-4, max_steps: 1, batch_size: 8, max_length: 96STAGE_LORA}
pipelines:
  sft: [sft]
eval:
  tasks: [{repo}/evals/skills_exact.yaml]
  limit: 2
"""


def recipe_text(model_lora: str = "lora: {r: 8}", stage_lora: str = "") -> str:
    return QLORA.replace("STAGE_LORA", stage_lora).replace("LORA", model_lora)


@pytest.mark.parametrize("model_lora, stage_lora, place", [
    ("", "", "qlora.yaml:10: stages.sft: model.quantization (QLoRA) loads 4-bit weights"),
    ("lora: {r: 8}", ", lora: false", "qlora.yaml:10: stages.sft.lora: model.quantization (QLoRA) loads 4-bit"),
])
def test_qlora_without_lora_is_refused_at_validate(tmp_path, repo, model_lora, stage_lora, place):
    path = write_recipe(tmp_path, repo, recipe_text(model_lora, stage_lora))
    path = path.rename(tmp_path / "qlora.yaml")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and place in result.output, result.output


def test_qlora_on_a_machine_without_a_gpu_is_refused_before_training(tmp_path, repo, isolated_cache):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path = write_recipe(tmp_path, repo, recipe_text())
    assert CliRunner().invoke(main, ["validate", str(path)]).exit_code == 0   # a recipe for a GPU machine
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "run"), "--no-wandb"])
    assert result.exit_code == 2, result.output
    assert ("model.quantization: 4-bit loading (QLoRA, bitsandbytes) needs a CUDA GPU and this machine has none; "
            "remove model.quantization to train LoRA on float32 weights here") in result.output
    assert "Traceback" not in result.output
    assert not list((isolated_cache / "stages").glob("*")) if (isolated_cache / "stages").exists() else True


def test_quantization_is_part_of_the_stage_key(tmp_path, repo):
    from posttrain.plan import make_plan
    from posttrain.recipe.load import load_recipe

    plain = make_plan(load_recipe(write_recipe(tmp_path, repo, recipe_text().replace(
        "  quantization: {bits: 4, quant_type: nf4}\n", ""))), tmp_path)
    quantized = make_plan(load_recipe(write_recipe(tmp_path, repo, recipe_text())), tmp_path)
    (a,), (b,) = plain.nodes.values(), quantized.nodes.values()
    assert a.key != b.key and b.inputs["base_model"]["quantization"]["quant_type"] == "nf4"
