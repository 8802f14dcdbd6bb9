"""`sweep:` (a grid over stage settings, expanded at validation) and `compare:` (no torch)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from posttrain.recipe.load import load_recipe, validate_recipe
from posttrain.recipe.references import matched_pipelines
from posttrain.recipe.schema import Recipe, dump_recipe, pipelines_with_base
from posttrain.errors import RecipeError

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
BETAS = "sweep.stages.dpo.beta=[0.05,0.1,0.3]"

GOOD = """\
name: t
model: {name: builtin:micro-llama}
data:
  ins: {source: builtin:skills}
  prefs: {source: builtin:skills-preferences}
stages:
  sft: {method: sft, data: ins, learning_rate: 1.0e-3}
  dpo: {method: dpo, data: prefs, learning_rate: 1.0e-4, beta: 0.1}
  orpo: {method: orpo, data: prefs, learning_rate: 1.0e-3}
pipelines:
  sft: [sft]
  sft+dpo: [sft, dpo]
  orpo: [orpo]
eval: {tasks: [evals/skills_exact.yaml]}
"""


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return info.value.problems


# ---------------------------------------------------------------- expansion


def test_three_point_beta_sweep_on_the_quickstart():
    plain = load_recipe(QUICKSTART)
    recipe = load_recipe(QUICKSTART, [BETAS])
    assert list(recipe.stages) == ["sft", "dpo[beta=0.05]", "dpo[beta=0.1]", "dpo[beta=0.3]", "orpo"]
    assert recipe.pipelines == {
        "sft": ["sft"],
        "sft+dpo[beta=0.05]": ["sft", "dpo[beta=0.05]"],
        "sft+dpo[beta=0.1]": ["sft", "dpo[beta=0.1]"],
        "sft+dpo[beta=0.3]": ["sft", "dpo[beta=0.3]"],
        "orpo": ["orpo"],
    }
    for beta in (0.05, 0.1, 0.3):
        variant = recipe.stages[f"dpo[beta={beta}]"]
        assert variant.beta == beta
        # everything else is the original dpo stage
        assert variant.model_copy(update={"beta": plain.stages["dpo"].beta}) == plain.stages["dpo"]
    # sft is untouched, under its own name, and shared by every expanded chain
    assert recipe.stages["sft"] == plain.stages["sft"]
    assert recipe.stages["orpo"] == plain.stages["orpo"]
    assert {chain[0] for name, chain in recipe.pipelines.items() if name.startswith("sft+dpo")} == {"sft"}
    assert recipe.sweep == {}
    assert recipe.report.baseline == "sft"
    assert list(pipelines_with_base(recipe))[:3] == ["base", "sft", "sft+dpo[beta=0.05]"]


def test_dumped_expanded_recipe_reproduces_the_run_without_the_sweep():
    recipe = load_recipe(QUICKSTART, [BETAS])
    dumped = dump_recipe(recipe)
    raw = yaml.safe_load(dumped)
    assert raw["sweep"] == {}
    again = validate_recipe(raw, "resolved.yaml")
    assert again == recipe
    assert dump_recipe(again) == dumped


def test_sweep_block_in_the_file_flat_keys(tmp_path):
    path = write(tmp_path, GOOD + "sweep:\n  stages.dpo.beta: [0.05, 0.3]\n")
    recipe = load_recipe(path)
    assert list(recipe.pipelines) == ["sft", "sft+dpo[beta=0.05]", "sft+dpo[beta=0.3]", "orpo"]
    assert [recipe.stages[n].beta for n in ("dpo[beta=0.05]", "dpo[beta=0.3]")] == [0.05, 0.3]
    assert "dpo" not in recipe.stages


def test_nested_form_from_the_command_line_equals_the_flat_form(tmp_path):
    flat = load_recipe(write(tmp_path, GOOD + "sweep:\n  stages.dpo.beta: [0.05, 0.3]\n", "a.yaml"))
    nested = load_recipe(write(tmp_path, GOOD + "sweep: {stages: {dpo: {beta: [0.05, 0.3]}}}\n", "b.yaml"))
    override = load_recipe(write(tmp_path, GOOD, "c.yaml"), ["sweep.stages.dpo.beta=[0.05, 0.3]"])
    assert flat == nested == override


def test_override_replaces_the_file_values_of_a_flat_key(tmp_path):
    path = write(tmp_path, GOOD + "sweep:\n  stages.dpo.beta: [0.05, 0.3]\n")
    recipe = load_recipe(path, ["sweep.stages.dpo.beta=[0.7]"])
    assert list(recipe.pipelines) == ["sft", "sft+dpo[beta=0.7]", "orpo"]
    assert list(load_recipe(path, ["sweep={}"]).pipelines) == ["sft", "sft+dpo", "orpo"]


def test_two_axis_grid_is_the_cartesian_product_in_declaration_order(tmp_path):
    path = write(tmp_path, GOOD + textwrap.dedent("""\
        sweep:
          stages.dpo.beta: [0.05, 0.1, 0.3]
          stages.dpo.learning_rate: [1.0e-5, 5.0e-5]
        """))
    recipe = load_recipe(path)
    expected = [(b, lr) for b in ("0.05", "0.1", "0.3") for lr in ("1e-05", "5e-05")]
    assert list(recipe.pipelines) == (
        ["sft"] + [f"sft+dpo[beta={b},learning_rate={lr}]" for b, lr in expected] + ["orpo"])
    assert list(recipe.stages) == (
        ["sft"] + [f"dpo[beta={b},learning_rate={lr}]" for b, lr in expected] + ["orpo"])
    stage = recipe.stages["dpo[beta=0.3,learning_rate=5e-05]"]
    assert (stage.beta, stage.learning_rate, stage.data) == (0.3, 5e-5, "prefs")
    assert recipe.pipelines["sft+dpo[beta=0.1,learning_rate=1e-05]"] == ["sft", "dpo[beta=0.1,learning_rate=1e-05]"]


def test_yaml11_exponent_without_dot_is_read_as_a_number_in_names(tmp_path):
    # YAML 1.1 reads 1e-5 as a string; the stage schema reads it as 1e-05, and so do the names.
    recipe = load_recipe(write(tmp_path, GOOD), ["sweep.stages.dpo.learning_rate=[1e-5]"])
    assert list(recipe.pipelines) == ["sft", "sft+dpo[learning_rate=1e-05]", "orpo"]
    assert recipe.stages["dpo[learning_rate=1e-05]"].learning_rate == 1e-5


def test_value_labels_use_compact_g_formatting(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD), ["sweep.stages.dpo.beta=[1.0, 0.12345678, 2.0e+8]",
                                                 "sweep.stages.dpo.loss_type=[ipo]", "sweep.stages.sft.lora=[false]"])
    assert list(recipe.pipelines)[:4] == ["sft[lora=False]", "sft+dpo[lora=False,beta=1,loss_type=ipo]",
                                          "sft+dpo[lora=False,beta=0.123457,loss_type=ipo]",
                                          "sft+dpo[lora=False,beta=2e+08,loss_type=ipo]"]
    assert recipe.stages["dpo[beta=0.123457,loss_type=ipo]"].beta == 0.12345678
    assert recipe.stages["sft[lora=False]"].lora is False


def test_two_swept_stages_in_one_chain(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path, ["sweep.stages.sft.learning_rate=[1.0e-3, 3.0e-3]", "sweep.stages.dpo.beta=[0.1, 0.5]"])
    assert list(recipe.stages) == ["sft[learning_rate=0.001]", "sft[learning_rate=0.003]",
                                   "dpo[beta=0.1]", "dpo[beta=0.5]", "orpo"]
    assert recipe.pipelines == {
        "sft[learning_rate=0.001]": ["sft[learning_rate=0.001]"],
        "sft[learning_rate=0.003]": ["sft[learning_rate=0.003]"],
        "sft+dpo[learning_rate=0.001,beta=0.1]": ["sft[learning_rate=0.001]", "dpo[beta=0.1]"],
        "sft+dpo[learning_rate=0.001,beta=0.5]": ["sft[learning_rate=0.001]", "dpo[beta=0.5]"],
        "sft+dpo[learning_rate=0.003,beta=0.1]": ["sft[learning_rate=0.003]", "dpo[beta=0.1]"],
        "sft+dpo[learning_rate=0.003,beta=0.5]": ["sft[learning_rate=0.003]", "dpo[beta=0.5]"],
        "orpo": ["orpo"],
    }


def test_a_field_swept_in_two_stages_of_one_chain_is_qualified(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path, ["sweep.stages.sft.learning_rate=[1.0e-3]",
                                "sweep.stages.dpo.learning_rate=[1.0e-5, 5.0e-5]", "sweep.stages.dpo.beta=[0.2]"])
    assert list(recipe.pipelines) == [
        "sft[learning_rate=0.001]",  # one swept stage: no qualifier
        "sft+dpo[sft.learning_rate=0.001,dpo.learning_rate=1e-05,beta=0.2]",
        "sft+dpo[sft.learning_rate=0.001,dpo.learning_rate=5e-05,beta=0.2]",
        "orpo",
    ]
    assert list(recipe.stages)[1:3] == ["dpo[learning_rate=1e-05,beta=0.2]", "dpo[learning_rate=5e-05,beta=0.2]"]


def test_unswept_stages_keep_their_names_even_when_in_no_pipeline(tmp_path):
    spare = "  spare: {method: sft, data: ins, learning_rate: 1.0}\n"
    text = GOOD.replace("  orpo: {method: orpo", spare + "  orpo: {method: orpo")
    recipe = load_recipe(write(tmp_path, text), [BETAS])
    assert list(recipe.stages) == ["sft", "dpo[beta=0.05]", "dpo[beta=0.1]", "dpo[beta=0.3]", "spare", "orpo"]


def test_a_swept_stage_used_by_several_pipelines_expands_each(tmp_path):
    text = GOOD.replace("  orpo: [orpo]", "  dpo-only: [dpo]\n  orpo: [orpo]")
    recipe = load_recipe(write(tmp_path, text), ["sweep.stages.dpo.beta=[0.1,0.2]"])
    assert list(recipe.pipelines) == ["sft", "sft+dpo[beta=0.1]", "sft+dpo[beta=0.2]",
                                      "dpo-only[beta=0.1]", "dpo-only[beta=0.2]", "orpo"]
    assert recipe.pipelines["dpo-only[beta=0.2]"] == ["dpo[beta=0.2]"]
    assert "dpo" not in recipe.stages


def test_sweeping_the_dataset_of_a_stage(tmp_path):
    text = GOOD.replace("  prefs: {source", "  ins2: {source: builtin:skills, limit: 10}\n  prefs: {source")
    recipe = load_recipe(write(tmp_path, text), ["sweep.stages.sft.data=[ins, ins2]"])
    assert [recipe.stages[n].data for n in ("sft[data=ins]", "sft[data=ins2]")] == ["ins", "ins2"]
    assert recipe.pipelines["sft+dpo[data=ins2]"] == ["sft[data=ins2]", "dpo"]


def test_cli_validate_counts_the_expanded_recipe():
    result = CliRunner().invoke(
        __import__("posttrain.cli", fromlist=["main"]).main, ["validate", str(QUICKSTART), "-o", BETAS])
    assert result.exit_code == 0, result.output
    assert "ok (5 pipelines, 5 stages, 1 seed(s))" in result.output


def test_sweep_validation_does_not_import_torch():
    code = ("import sys; from posttrain.recipe.load import load_recipe; "
            f"load_recipe('recipes/quickstart.yaml', [{BETAS!r}, 'compare={{match: tokens}}']); "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'lm_eval', 'wandb', 'datasets') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_recipe_model_refuses_an_unexpanded_sweep():
    raw = yaml.safe_load(dump_recipe(load_recipe(QUICKSTART)))
    raw["sweep"] = {"stages.dpo.beta": [0.1, 0.2]}
    with pytest.raises(ValueError, match="expanded by load_recipe"):
        Recipe.model_validate(raw)


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_still_validates_unchanged(path):
    recipe = load_recipe(path)
    raw = yaml.safe_load(path.read_text())
    assert recipe.sweep == {}
    assert list(recipe.pipelines) == list(raw["pipelines"])
    assert list(recipe.stages) == list(raw["stages"])


# ---------------------------------------------------------------- errors


def test_bad_values_with_paths_and_lines_reported_with_other_problems(tmp_path):
    text = GOOD.replace("ins: {source: builtin:skills}", "ins: {source: builtin:skills, fromat: x}")
    text += textwrap.dedent("""\
        sweep:
          stages.dpo.beta: [0.05, -1, 0.3]
          stages.dpo.loss_type:
            - sigmoid
            - hinj
        """)
    problems = problems_of(write(tmp_path, text))
    assert problems == [
        "recipe.yaml:4: data.ins.fromat: unknown key; did you mean 'format'?",
        "recipe.yaml:16: sweep.stages.dpo.beta[1]: must be > 0.0",
        "recipe.yaml:19: sweep.stages.dpo.loss_type[1]: must be one of 'sigmoid', 'hinge', 'ipo', 'exo_pair', "
        "'nca_pair', 'robust', 'bco_pair', 'sppo_hard', 'aot', 'aot_unpaired', 'apo_zero', 'apo_down', "
        "'discopop', 'sft' or 'sigmoid_norm'",
    ]


def test_bad_value_line_in_the_nested_form(tmp_path):
    text = GOOD + "sweep:\n  stages:\n    dpo:\n      beta:\n        - 0.1\n        - 0\n"
    assert problems_of(write(tmp_path, text)) == ["recipe.yaml:20: sweep.stages.dpo.beta[1]: must be > 0.0"]


def test_bad_value_from_the_command_line_has_no_line(tmp_path):
    assert problems_of(write(tmp_path, GOOD), ["sweep.stages.dpo.beta=[0.1, -2]"]) == [
        "recipe.yaml: sweep.stages.dpo.beta[1]: must be > 0.0"]


def test_bad_dataset_values_are_checked_like_stage_data(tmp_path):
    problems = problems_of(write(tmp_path, GOOD), ["sweep.stages.dpo.data=[prefs, ins, nope]"])
    assert problems == [
        "recipe.yaml: sweep.stages.dpo.data[1]: dpo needs preference data (prompt, chosen, rejected); "
        "'ins' is instruction data",
        "recipe.yaml: sweep.stages.dpo.data[2]: unknown dataset 'nope' (known: ins, prefs)",
    ]


def test_non_list_empty_and_repeated_values(tmp_path):
    path = write(tmp_path, GOOD)
    assert problems_of(path, ["sweep.stages.dpo.beta=0.1"]) == [
        "recipe.yaml: sweep.stages.dpo.beta: must be a list of values"]
    assert problems_of(path, ["sweep.stages.dpo.beta=[]"]) == ["recipe.yaml: sweep.stages.dpo.beta: must not be empty"]
    assert problems_of(path, ["sweep.stages.dpo.beta=[0.1, 0.2, 0.10]"]) == [
        "recipe.yaml: sweep.stages.dpo.beta[2]: same as [0] (0.1); sweep distinct values"]
    assert problems_of(path, ["sweep=[1, 2]"]) == [
        "recipe.yaml: sweep: must be a mapping of stages.<stage>.<field> to lists of values"]


def test_only_stage_settings_can_be_swept(tmp_path):
    text = GOOD + textwrap.dedent("""\
        sweep:
          model.name: [builtin:tiny-llama]
          seeds: [[0], [1]]
          stages.dpo: [1]
          stages.dpx.beta: [0.1]
          stages.sft.beta: [0.1]
          stages.dpo.method: [orpo]
        """)
    problems = problems_of(write(tmp_path, text))
    help_ = "only stage settings can be swept (stages.<stage>.<field>)"
    assert problems[:5] == [
        f"recipe.yaml:16: sweep.model.name: {help_}",
        f"recipe.yaml:17: sweep.seeds: {help_}",
        f"recipe.yaml:18: sweep.stages.dpo: {help_}",
        "recipe.yaml:19: sweep.stages.dpx.beta: unknown stage 'dpx' (known: sft, dpo, orpo)",
        "recipe.yaml:20: sweep.stages.sft.beta: unknown setting 'beta' of a sft stage (settings: data, "
        "learning_rate, epochs, max_steps, batch_size, gradient_accumulation, max_device_batch, max_length, "
        "warmup_ratio, scheduler, weight_decay, max_grad_norm, seed, lora, logging_steps, gradient_checkpointing, "
        "use_liger_kernel, "
        "warmup_steps, optim, dataset_num_proc, eval_data, eval_steps, trainer, resources, packing, padding_free)",
    ]
    assert problems[5:] == [
        "recipe.yaml:21: sweep.stages.dpo.method: the method cannot be swept (declare another stage)"]


def test_a_swept_stage_in_no_pipeline(tmp_path):
    text = GOOD.replace("  orpo: [orpo]\n", "")
    assert problems_of(write(tmp_path, text), ["sweep.stages.orpo.beta=[0.1, 0.2]"]) == [
        "recipe.yaml: sweep.stages.orpo: stage 'orpo' is in no pipeline"]


def test_expanded_names_that_collide_with_declared_ones(tmp_path):
    text = GOOD.replace("  orpo: [orpo]", "  'sft+dpo[beta=0.2]': [sft]\n  orpo: [orpo]")
    assert problems_of(write(tmp_path, text), ["sweep.stages.dpo.beta=[0.1, 0.2]"]) == [
        "recipe.yaml: sweep: the sweep's pipeline 'sft+dpo[beta=0.2]' is already a pipeline of the recipe"]


def test_baseline_naming_a_pipeline_the_sweep_expanded_away(tmp_path):
    path = write(tmp_path, GOOD + "report: {baseline: sft+dpo}\n")
    assert problems_of(path, [BETAS]) == [
        "recipe.yaml:15: report.baseline: 'sft+dpo' is expanded by the sweep; "
        "name one of: sft+dpo[beta=0.05], sft+dpo[beta=0.1], sft+dpo[beta=0.3]"]
    assert load_recipe(path, [BETAS, "report.baseline=sft+dpo[beta=0.1]"]).report.baseline == "sft+dpo[beta=0.1]"
    assert load_recipe(path, [BETAS, "report.baseline=orpo"]).report.baseline == "orpo"
    assert problems_of(path, [BETAS, "report.baseline=sft+dpo[beta=0.2]"]) == [
        "recipe.yaml:15: report.baseline: unknown pipeline 'sft+dpo[beta=0.2]'"]


def test_baseline_problem_is_reported_with_a_bad_value(tmp_path):
    path = write(tmp_path, GOOD + "report: {baseline: sft+dpo}\n")
    assert problems_of(path, ["sweep.stages.dpo.beta=[0.1, -1]"]) == [
        "recipe.yaml: sweep.stages.dpo.beta[1]: must be > 0.0",
        "recipe.yaml:15: report.baseline: 'sft+dpo' is expanded by the sweep; "
        "name one of: sft+dpo[beta=0.1], sft+dpo[beta=-1]"]


def test_grid_size_guard(tmp_path):
    path = write(tmp_path, GOOD)
    eight = "[" + ", ".join(f"0.{i}" for i in range(1, 9)) + "]"
    nine = "[" + ", ".join(f"0.{i}" for i in range(1, 10)) + "]"
    lrs = "[" + ", ".join(f"{i}.0e-5" for i in range(1, 9)) + "]"
    assert len(load_recipe(path, [f"sweep.stages.dpo.beta={eight}", f"sweep.stages.dpo.learning_rate={lrs}"]
                           ).pipelines) == 2 + 64
    assert problems_of(path, [f"sweep.stages.dpo.beta={nine}", f"sweep.stages.dpo.learning_rate={lrs}"]) == [
        "recipe.yaml: sweep: 72 grid points; at most 64"]
    # grid points are the pipelines the sweep makes: sft gives 2, sft+dpo 2 x 32
    betas = "[" + ", ".join(f"0.{i:02d}" for i in range(1, 33)) + "]"
    assert problems_of(path, ["sweep.stages.sft.learning_rate=[1.0e-3, 2.0e-3]", f"sweep.stages.dpo.beta={betas}"]) == [
        "recipe.yaml: sweep: 66 grid points; at most 64"]
    huge = "[" + ", ".join(str(i) for i in range(1, 1001)) + "]"
    assert problems_of(path, [f"sweep.stages.dpo.beta={huge}", f"sweep.stages.dpo.max_length={huge}",
                              f"sweep.stages.dpo.batch_size={huge}"]) == [
        "recipe.yaml: sweep: 1000000000 grid points; at most 64"]


# ---------------------------------------------------------------- compare


def test_compare_default_reference_is_the_first_longest_pipeline():
    recipe = load_recipe(QUICKSTART, ["compare={match: tokens}"])
    assert recipe.compare.match == "tokens" and recipe.compare.reference is None
    assert matched_pipelines(recipe) == ("sft+dpo", ["orpo"])
    swept = load_recipe(QUICKSTART, ["compare={match: tokens}", BETAS])
    assert matched_pipelines(swept) == ("sft+dpo[beta=0.05]", ["orpo"])
    # a swept ORPO stage gives several single-step pipelines, all matched
    orpos = load_recipe(QUICKSTART, ["compare={match: tokens}", "sweep.stages.orpo.beta=[0.1, 0.2]"])
    assert matched_pipelines(orpos) == ("sft+dpo", ["orpo[beta=0.1]", "orpo[beta=0.2]"])


def test_compare_explicit_reference():
    recipe = load_recipe(QUICKSTART, ["compare={match: tokens, reference: sft}"])
    assert matched_pipelines(recipe) == ("sft", ["orpo"])
    swept = load_recipe(QUICKSTART, [BETAS, "compare={match: tokens, reference: 'sft+dpo[beta=0.3]'}"])
    assert matched_pipelines(swept) == ("sft+dpo[beta=0.3]", ["orpo"])


def test_matched_pipelines_without_a_compare_block_uses_the_default():
    assert matched_pipelines(load_recipe(QUICKSTART)) == ("sft+dpo", ["orpo"])


def test_compare_errors():
    assert problems_of(QUICKSTART, [BETAS, "compare={match: tokens, reference: sft+dpo}"]) == [
        "quickstart.yaml: compare.reference: 'sft+dpo' is expanded by the sweep; "
        "name one of: sft+dpo[beta=0.05], sft+dpo[beta=0.1], sft+dpo[beta=0.3]"]
    assert problems_of(QUICKSTART, ["compare={match: tokens, reference: dpo}"]) == [
        "quickstart.yaml: compare.reference: unknown pipeline 'dpo' (pipelines: sft, sft+dpo, orpo)"]
    assert problems_of(QUICKSTART, ["compare={match: tokens}", "pipelines={sft: [sft], sft+dpo: [sft, dpo]}"]) == [
        "quickstart.yaml: compare: no single-step pipeline (a pipeline of one cpo or orpo stage) to match"]
    problems = problems_of(QUICKSTART, ["compare={match: steps}"])
    assert problems == ["quickstart.yaml: compare.match: must be one of 'tokens'"]


def test_compare_in_the_file_with_lines(tmp_path):
    path = write(tmp_path, GOOD.replace("  orpo: [orpo]\n", "") + "compare:\n  match: tokens\n")
    assert problems_of(path) == [
        "recipe.yaml:14: compare: no single-step pipeline (a pipeline of one cpo or orpo stage) to match"]
