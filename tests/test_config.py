"""Recipe schema, overrides and error reporting (no torch)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from posttrain.recipe.load import load_recipe
from posttrain.recipe.schema import pipelines_with_base
from posttrain.errors import RecipeError

REPO = Path(__file__).resolve().parent.parent

GOOD = """
name: t
model: {name: builtin:micro-llama}
data:
  ins: {source: builtin:skills}
  prefs: {source: builtin:skills-preferences}
stages:
  sft: {method: sft, data: ins, learning_rate: 1.0e-3}
  dpo: {method: dpo, data: prefs, learning_rate: 1.0e-4, beta: 0.1}
pipelines:
  sft: [sft]
  sft+dpo: [sft, dpo]
eval: {tasks: [evals/skills_exact.yaml]}
"""


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.pipelines


def test_good_recipe_and_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert recipe.stages["dpo"].loss_type == "sigmoid"
    assert recipe.stages["dpo"].precompute_ref_log_probs is True
    assert list(pipelines_with_base(recipe)) == ["base", "sft", "sft+dpo"]


def test_three_independent_mistakes_all_reported_with_paths_and_lines(tmp_path):
    bad = GOOD.replace("ins: {source: builtin:skills}", "ins: {source: builtin:skills, fromat: x}")
    bad = bad.replace("beta: 0.1", "beta: -0.1").replace("sft+dpo: [sft, dpo]", "sft+dpo: [sft, dop]")
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, bad))
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert "recipe.yaml:5: data.ins.fromat: unknown key; did you mean 'format'?" in problems
    assert "recipe.yaml:9: stages.dpo.beta: must be > 0.0" in problems
    assert any(p.startswith("recipe.yaml:12: pipelines.sft+dpo[1]: unknown stage 'dop'") for p in problems)


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, GOOD)
    assert load_recipe(path, ["stages.dpo.beta=0.3"]).stages["dpo"].beta == 0.3
    assert load_recipe(path, ["seeds=[1, 2]"]).seeds == [1, 2]
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["stages.dpo.beta=0", "stages.dpo.loss_type=nope"])
    text = "\n".join(info.value.problems)
    assert "stages.dpo.beta: must be > 0" in text
    assert "stages.dpo.loss_type: must be one of" in text


def test_wrong_method_and_data_kind(tmp_path):
    bad = GOOD.replace("method: sft, data: ins", "method: ppo, data: ins").replace(
        "method: dpo, data: prefs", "method: dpo, data: ins")
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, bad))
    text = "\n".join(info.value.problems)
    assert "stages.sft: unknown method 'ppo'" in text
    assert "stages.dpo.data: dpo needs preference data (prompt, chosen, rejected); 'ins' is instruction data" in text


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "name: [unclosed"))
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_validate_does_not_import_torch():
    code = ("import sys; from posttrain.recipe.load import load_recipe; "
            "load_recipe('recipes/quickstart.yaml'); import posttrain.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'lm_eval', 'wandb', 'datasets') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
