"""A method is one module: everything else derives from its declaration."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.errors import RecipeError
from posttrain.recipe.load import validate_recipe
from posttrain.recipe.references import matched_pipelines
from posttrain.stages import METHODS

REPO = Path(__file__).resolve().parent.parent

TOY = '''
from typing import Literal

from posttrain.recipe.fields import StageBase
from posttrain.stages.method import PREFERENCE, Method
from posttrain.stages.sft import train as sft_train


class ToyStage(StageBase):
    method: Literal["toy"]
    temperature: float = 1.0


METHOD = Method(name="toy", settings=ToyStage, summary="a toy", trainer="none", data=PREFERENCE,
                single_step=True)


def build_trainer(ctx):
    return None


def train(ctx):
    return sft_train(ctx)
'''


def recipe(stages: dict, pipelines: dict) -> dict:
    return {"name": "m", "model": {"name": "builtin:micro-llama"},
            "data": {"ins": {"source": "builtin:skills"}, "prefs": {"source": "builtin:skills-preferences"}},
            "stages": stages, "pipelines": pipelines, "eval": {"tasks": ["evals/skills.yaml"]}}


def stage(method, data="prefs"):
    return {"method": method, "data": data, "learning_rate": 1e-3}


def test_every_method_is_a_stage_the_schema_takes():
    stages = {name: stage(name, "ins" if method.data == "instruction" else "prefs")
              for name, method in METHODS.items()}
    parsed = validate_recipe(recipe(stages, {name: [name] for name in stages}), "r.yaml")
    assert {name: type(spec) for name, spec in parsed.stages.items()} == {
        name: method.settings for name, method in METHODS.items()}
    assert {"sft", "dpo", "orpo", "kto", "cpo"} <= set(METHODS)


def test_compute_matching_takes_the_declared_single_step_methods():
    single = [name for name, method in METHODS.items() if method.single_step]
    stages = {"sft": stage("sft", "ins"), "dpo": stage("dpo"),
              **{name: stage(name) for name in single}}
    pipelines = {"sft+dpo": ["sft", "dpo"], **{name: [name] for name in single}}
    parsed = validate_recipe({**recipe(stages, pipelines), "compare": {"match": "tokens"}}, "r.yaml")
    assert matched_pipelines(parsed) == ("sft+dpo", single)
    assert {"orpo", "cpo"} <= set(single) and "kto" not in single


def test_a_method_gets_data_it_can_read():
    bad = recipe({"kto": stage("kto", "ins")}, {"p": ["kto"]})
    with pytest.raises(RecipeError) as info:
        validate_recipe(bad, "r.yaml")
    assert info.value.problems == ["r.yaml: stages.kto.data: kto needs unpaired data (prompt, completion, boolean "
                                   "label) or preference pairs; 'ins' is instruction data"]


def test_methods_command_lists_each_declaration():
    out = subprocess.run([sys.executable, "-m", "posttrain", "methods"], capture_output=True, text=True, check=True)
    for name, method in METHODS.items():
        assert f"{name}: {method.summary}" in out.stdout
    one = subprocess.run([sys.executable, "-m", "posttrain", "methods", "kto"], capture_output=True, text=True,
                         check=True).stdout
    assert "desirable_weight (default 1.0)" in one and "learning_rate" not in one


def test_adding_a_method_is_adding_its_module(tmp_path):
    """A copy of the package with one more file under stages/: the schema, validate, the
    CLI's method list and compute matching know the new method; nothing else was edited."""
    shutil.copytree(REPO / "posttrain", tmp_path / "posttrain", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "posttrain" / "stages" / "toy.py").write_text(TOY)
    shutil.copytree(REPO / "evals", tmp_path / "evals")
    doc = recipe({"sft": stage("sft", "ins"), "dpo": stage("dpo"), "toy": {**stage("toy"), "temperature": 0.5}},
                 {"sft+dpo": ["sft", "dpo"], "toy": ["toy"]})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**doc, "compare": {"match": "tokens"}}))
    code = ("from posttrain.recipe.load import load_recipe; from posttrain.recipe.references import "
            "matched_pipelines; r = load_recipe('r.yaml'); print(type(r.stages['toy']).__name__, "
            "r.stages['toy'].temperature, matched_pipelines(r))")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "ToyStage 0.5 ('sft+dpo', ['toy'])", out.stderr
    listed = subprocess.run([sys.executable, "-m", "posttrain", "methods"], cwd=tmp_path, capture_output=True,
                            text=True, env=env)
    assert "toy: a toy" in listed.stdout, listed.stderr


def test_a_setting_added_later_keeps_the_keys_of_stages_that_never_set_it():
    """DPO's label_smoothing and discopop_tau came after stage keys were published: at their
    defaults they are not hashed (cached stages and results stay valid); set, they are."""
    from posttrain.stages.dpo import DPOStage

    plain = DPOStage(method="dpo", data="d", learning_rate=1e-3)
    assert set(plain.key_settings()) == set(plain.model_dump()) - {
        "lora", "logging_steps", "dataset_num_proc", "max_device_batch", "resources", "label_smoothing", "discopop_tau",
        *plain.COMMON_OMITS_DEFAULT}
    tuned = DPOStage(method="dpo", data="d", learning_rate=1e-3, gradient_checkpointing=True, optim="adafactor",
                     trainer={"neftune_noise_alpha": 5})
    assert {"gradient_checkpointing": True, "optim": "adafactor", "trainer": {"neftune_noise_alpha": 5}}.items() \
        <= tuned.key_settings().items()
    robust = DPOStage(method="dpo", data="d", learning_rate=1e-3, loss_type="robust", label_smoothing=0.1)
    assert robust.key_settings()["label_smoothing"] == 0.1 and "discopop_tau" not in robust.key_settings()


def test_each_method_plots_curves_it_logs():
    """The report plots a stage's declared curves; each is one of the method's metrics."""
    for method in METHODS.values():
        assert method.curves and set(method.curves) <= set(method.metrics), method.name
    assert "kl" in METHODS["kto"].curves


TRUNCATION = {"max_length", "max_prompt_length", "max_completion_length", "truncation_mode"}


def trl_config(method):
    """The TRL config class of a method's trainer (`Method.trainer`: trl...XTrainer)."""
    import importlib
    import warnings

    module, _, trainer = METHODS[method].trainer.split()[0].rpartition(".")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # trl.experimental warns on import
        return getattr(importlib.import_module(module), trainer.replace("Trainer", "Config"))


def test_each_method_offers_the_truncation_its_trl_config_has_and_reads(tmp_path):
    """TRL 1.16: no config has max_prompt_length; SFT and DPO have truncation_mode, whose
    other value (keep_end) is deprecated for removal ("the only supported value is
    keep_start"); ORPO and CPO read max_completion_length for encoder-decoder models only,
    and posttrain trains causal LMs. So a stage offers max_length alone (and passes the rest
    explicitly). A TRL upgrade that changes any of this fails here: offer the new setting."""
    import dataclasses

    from posttrain.models import ModelSource
    from posttrain.stages.common import StageContext
    from posttrain.stages.orpo import build_trainer

    has = {name: TRUNCATION & {f.name for f in dataclasses.fields(trl_config(name))} for name in METHODS}
    assert has == {"sft": {"max_length", "truncation_mode"}, "dpo": {"max_length", "truncation_mode"},
                   "kto": {"max_length"}, "orpo": {"max_length", "max_completion_length"},
                   "cpo": {"max_length", "max_completion_length"}, "simpo": {"max_length", "max_completion_length"}}
    for name, method in METHODS.items():
        assert TRUNCATION & set(method.settings.model_fields) == {"max_length"}, name
    with pytest.warns(FutureWarning, match="keep_end"):
        trl_config("dpo")(output_dir=str(tmp_path), use_cpu=True, bf16=False, truncation_mode="keep_end")
    # ORPO (CPO's tokenization is the same code) cuts a causal LM's reply at max_length only.
    spec = METHODS["orpo"].settings(method="orpo", data="d", learning_rate=1e-3, max_length=64)
    pair = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a" * 20}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    (tmp_path / "orpo").mkdir()
    trainer, _ = build_trainer(StageContext(name="orpo", spec=spec, seed=0, start=ModelSource("builtin:micro-llama"),
                                            examples=[pair], out_dir=tmp_path / "orpo"))
    trainer.max_completion_length = 2
    row = trainer.train_dataset[0]
    tokens = trainer.tokenize_row({key: row[key] for key in ("prompt", "chosen", "rejected")})
    # The reply, "<|im_end|>\n" and the EOS TRL appends: nowhere near max_completion_length.
    assert sum(label != -100 for label in tokens["chosen_labels"]) == 20 + 3
