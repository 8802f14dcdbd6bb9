"""Check before spending: what `validate` (no heavy import) and `plan`/`run` (before any
stage trains) catch, each problem under its recipe key, exit 2, nothing trained or touched."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from posttrain.artifacts import PathEscape
from posttrain.cli import main
from posttrain.evaluate import TaskRef, check_task_entries, install_hint, prepare_task_dir, task_problems

RECIPE = """
name: pre
model: {{name: builtin:micro-llama{lora}}}
data:
  ins: {{source: {source}, limit: 32}}
stages:
  sft: {{method: sft, data: ins, learning_rate: 1.0e-2, max_steps: 2, batch_size: 8, max_length: 64{stage_lora}}}
pipelines:
  sft: [sft]
eval:
  tasks: {tasks}
  limit: 4
"""

TASK = """
task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: rows.jsonl}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
"""


def write(tmp_path, tasks, source="builtin:skills", lora="", stage_lora=""):
    path = tmp_path / "pre.yaml"
    path.write_text(RECIPE.format(tasks=json.dumps(tasks), source=source, lora=lora, stage_lora=stage_lora))
    return path


def task_file(folder, file_name, name, extra=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.jsonl").write_text('{"q": "1+1", "a": "2"}\n')
    path = folder / file_name
    path.write_text(TASK.format(name=name) + textwrap.dedent(extra))
    return path


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture
def victim(tmp_path):
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    return folder


def assert_untouched(victim):
    assert [p.name for p in victim.iterdir()] == ["precious.txt"]
    assert (victim / "precious.txt").read_text() == "keep me"


def assert_nothing_trained(cache):
    assert not list(cache.glob("stages/*")), "a stage was trained"


# ---------------------------------------------------------------- validate (static)


def test_validate_reports_every_file_problem_at_once_without_heavy_imports(tmp_path, repo):
    task_file(tmp_path / "evals", "bad_data.yaml", "bad_data").write_text(
        TASK.format(name="bad_data").replace("rows.jsonl", "absent.jsonl"))
    recipe = write(tmp_path, ["evals/bad_data.yaml", "evals/nope.yaml", str(repo / "evals/skills_mc.yaml")],
                   source="data/missing.jsonl")
    code = ("import sys; from click.testing import CliRunner; from posttrain.cli import main; "
            f"r = CliRunner().invoke(main, ['validate', {str(recipe)!r}]); print(r.output); print(r.exit_code); "
            "print(sorted(m for m in ('torch', 'transformers', 'lm_eval', 'datasets', 'peft') if m in sys.modules))")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path).stdout
    assert time.perf_counter() - started < 5
    lines = out.strip().splitlines()
    assert lines[-2:] == ["2", "[]"], out
    assert f"pre.yaml:5: data.ins.source: data file not found: {tmp_path / 'data/missing.jsonl'}" in out
    assert "pre.yaml:11: eval.tasks[0]:" in out and "data file not found: absent.jsonl" in out
    assert "eval.tasks[1]: task file not found: evals/nope.yaml" in out


def test_validate_reports_unknown_builtin_model_and_missing_model_folders(tmp_path, repo, monkeypatch):
    monkeypatch.chdir(tmp_path)   # transformers takes a relative model path from the cwd
    (tmp_path / "not-a-model").mkdir()
    recipe = write(tmp_path, [str(repo / "evals/skills_mc.yaml")])
    recipe.write_text(recipe.read_text().replace("builtin:micro-llama", "builtin:nano-llama")
                      + "external: {mine: ./no-such-model, empty: ./not-a-model}\n")
    result = invoke("validate", recipe)
    assert result.exit_code == 2
    assert "pre.yaml:3: model.name: unknown builtin model 'builtin:nano-llama'" in result.output
    assert (f"external.mine: local model folder not found: {tmp_path / 'no-such-model'} "
            "(a relative path is taken from the cwd)") in result.output
    assert f"external.empty: not a model folder (no config.json): {tmp_path / 'not-a-model'}" in result.output


# ---------------------------------------------------------------- task names that are paths


def test_task_name_that_is_a_path_is_refused_by_validate_plan_and_run(tmp_path, victim, isolated_cache):
    task_file(tmp_path / "evals", "evil.yaml", "../../victim")
    recipe = write(tmp_path, ["evals/evil.yaml"])
    for args in (["validate", recipe], ["plan", recipe], ["run", recipe, "--out", tmp_path / "run"],
                 ["run", recipe, "--dry-run"]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "eval.tasks[0]:" in result.output and "task: '../../victim' is not a valid name" in result.output
        assert_untouched(victim)
    assert not (tmp_path / "run").exists()
    assert_nothing_trained(isolated_cache)


@pytest.mark.parametrize("name", ["../victim", "/abs/victim", "a/b", "..", "ok\x00no"])
def test_task_names_that_are_not_folder_names_are_reported(tmp_path, name):
    path = task_file(tmp_path, "t.yaml", "x")
    path.write_text(path.read_text().replace("task: x", f"task: {json.dumps(name)}"))
    refs, problems = check_task_entries([str(path)], [tmp_path])
    assert refs == [] and len(problems) == 1
    assert problems[0][0] == 0 and "is not a valid name" in problems[0][1]


def test_prepare_task_dir_writes_and_deletes_only_inside_its_folder(tmp_path, victim):
    source = task_file(tmp_path / "evals", "t.yaml", "x")
    for name in ("../victim", str(victim), "../../" + victim.name):
        with pytest.raises(PathEscape):
            prepare_task_dir([TaskRef(name=name, path=source)], tmp_path / "run" / "evals" / "tasks")
        assert_untouched(victim)
    bad_function = task_file(tmp_path / "evals2", "f.yaml", "f", "process_docs: !function ../victim/precious.fn\n")
    _, problems = check_task_entries([str(bad_function)], [tmp_path])
    assert "!function ../victim/precious.fn: expected module.function" in problems[0][1]


# ---------------------------------------------------------------- heavy checks in plan / run


def test_registry_tasks_misspelt_offline_or_missing_extra_fail_in_plan(tmp_path, monkeypatch, isolated_cache):
    """One plan, three registry problems (~10 s: lm-eval's task index is built once)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-datasets-cache"))
    monkeypatch.setitem(sys.modules, "langdetect", None)   # ifeval's extra, missing whatever is installed
    for module in [m for m in sys.modules if m.startswith("lm_eval.tasks.ifeval")]:
        monkeypatch.delitem(sys.modules, module)
    recipe = write(tmp_path, ["arc_eazy", "arc_easy", "ifeval"])
    started = time.perf_counter()
    result = invoke("plan", recipe)
    seconds = time.perf_counter() - started
    assert result.exit_code == 2, result.output
    out = result.output
    assert "eval.tasks[0]: 'arc_eazy' is not an lm-eval task, group or tag; did you mean 'arc_easy'" in out
    assert ("eval.tasks[1]: task 'arc_easy' needs the Hugging Face Hub (dataset allenai/ai2_arc (ARC-Easy) "
            "is not in the local cache") in out
    assert "eval.tasks[2]: task 'ifeval' needs the Python package 'langdetect'" in out
    assert 'pip install "lm-eval[ifeval]"' in out
    assert "lm-eval task index built in" in out
    assert_nothing_trained(isolated_cache)
    print(f"plan with registry checks: {seconds:.1f} s")


def test_local_task_with_missing_dependency_fails_in_plan_naming_the_extra(tmp_path, monkeypatch, isolated_cache):
    monkeypatch.setitem(sys.modules, "langdetect", None)
    uses = "process_docs: !function helpers.process\n"
    evals = tmp_path / "evals"
    task_file(evals, "lang.yaml", "lang", uses)
    (evals / "helpers.py").write_text("import langdetect\n\n\ndef process(ds):\n    return ds\n")
    task_file(evals / "other", "other.yaml", "other", uses)
    (evals / "other" / "helpers.py").write_text("import posttrain_no_such_package.sub\n\n\ndef process(ds):\n"
                                                "    return ds\n")
    result = invoke("plan", write(tmp_path, ["evals/lang.yaml", "evals/other/other.yaml"]))
    assert result.exit_code == 2, result.output
    assert ("eval.tasks[0]: task 'lang' needs the Python package 'langdetect', which is not installed; "
            'install it with: pip install "lm-eval[ifeval]"') in result.output
    assert ("eval.tasks[1]: task 'other' needs the Python package 'posttrain_no_such_package', which is not "
            "installed; install it with: pip install posttrain_no_such_package") in result.output
    assert_nothing_trained(isolated_cache)


def test_bad_lora_targets_fail_at_the_start_of_run_naming_the_key(tmp_path, repo, isolated_cache):
    recipe = write(tmp_path, [str(repo / "evals/skills_mc.yaml")],
                   lora=", lora: {r: 4, alpha: 8, target_modules: [q_proj, q_projj]}",
                   stage_lora=", lora: {r: 4, alpha: 8, target_modules: [input_layernorm]}")
    out = tmp_path / "run"
    result = invoke("run", recipe, "--out", out)
    assert result.exit_code == 2, result.output
    assert "model.lora.target_modules[1]: 'q_projj' matches no module of the model; did you mean 'q_proj'?" \
        in result.output
    assert "model.lora.target_modules[0]" not in result.output
    assert ("stages.sft.lora.target_modules[0]: 'input_layernorm' matches only LlamaRMSNorm modules, "
            "which LoRA cannot adapt") in result.output
    assert_nothing_trained(isolated_cache)
    assert not (out / "stages").exists() or not list((out / "stages").iterdir())


def test_lora_targets_that_exist_and_all_linear_pass(tmp_path):
    from posttrain.models import build_char_tokenizer, builtin_config, lora_target_problems, meta_model

    model = meta_model(builtin_config("builtin:micro-llama", build_char_tokenizer()))
    assert next(model.parameters()).is_meta
    assert lora_target_problems(model, "all-linear") == []
    assert lora_target_problems(model, ["q_proj", "v_proj", "mlp.down_proj", "lm_head"]) == []
    assert [i for i, _ in lora_target_problems(model, ["q_proj", "attn.q_proj"])] == [1]


def test_hub_model_not_cached_offline_fails_in_plan(tmp_path, repo, isolated_cache):
    recipe = write(tmp_path, [str(repo / "evals/skills_mc.yaml")])
    recipe.write_text(recipe.read_text().replace("builtin:micro-llama", "someorg/not-cached-model"))
    result = invoke("plan", recipe)
    assert result.exit_code == 2, result.output
    assert ("model.name: 'someorg/not-cached-model' is not in the local Hugging Face cache and the Hub is off "
            "(HF_HUB_OFFLINE)") in result.output
    assert_nothing_trained(isolated_cache)


def test_chat_template_that_does_not_render_is_reported():
    from posttrain.models import build_char_tokenizer, chat_template_problem

    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('System role not supported') }}"
    assert "does not render a sample conversation" in chat_template_problem(tokenizer, "model")
    assert chat_template_problem(build_char_tokenizer(), "chatml") is None


# ---------------------------------------------------------------- task data reachable / cached


@pytest.fixture
def cached_hub_dataset(tmp_path, monkeypatch):
    """`someorg/tinyset` (config `cfg1`) in a datasets cache, laid out as a hub download leaves it."""
    import datasets
    from datasets.packaged_modules.json.json import Json

    cache = tmp_path / "datasets-cache"
    rows = tmp_path / "hub-rows.jsonl"
    rows.write_text('{"q": "1+1", "a": "2"}\n')
    Json(cache_dir=str(tmp_path / "build"), dataset_name="tinyset", config_name="cfg1",
         data_files={"test": str(rows)}).download_and_prepare()
    built = next((tmp_path / "build" / "tinyset").glob("cfg1-*/0.0.0"))
    target = cache / "someorg___tinyset" / "cfg1" / "0.0.0" / built.parent.name.split("-")[-1]
    target.parent.mkdir(parents=True)
    built.rename(target)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def test_task_data_on_the_hub_is_checked_against_the_cache_offline(tmp_path, cached_hub_dataset):
    refs = []
    for name, config in (("cached", "cfg1"), ("uncached", "cfg2"), ("unknown", None)):
        path = task_file(tmp_path / name, "t.yaml", name)
        text = path.read_text().replace("dataset_path: json", "dataset_path: someorg/tinyset" if name != "unknown"
                                        else "dataset_path: someorg/other")
        path.write_text(text.replace("dataset_kwargs: {data_files: {test: rows.jsonl}}",
                                     f"dataset_name: {config}" if config else ""))
        refs.append(TaskRef(name=name, path=path))
    problems = dict(task_problems(refs, task_dir=None))
    assert 0 not in problems, problems[0]
    assert problems[1].startswith("task 'uncached' needs the Hugging Face Hub (dataset someorg/tinyset (cfg2) "
                                  "is not in the local cache")
    assert "datasets.load_dataset('someorg/tinyset', 'cfg2')" in problems[1]
    assert problems[2].startswith("task 'unknown' needs the Hugging Face Hub (dataset someorg/other")


def test_install_hint_names_the_lm_eval_extra_or_the_package():
    ifeval_yaml = "/x/site-packages/lm_eval/tasks/ifeval/ifeval.yaml"
    for module in ("langdetect", "immutabledict"):
        assert install_hint(module) == 'install it with: pip install "lm-eval[ifeval]"'
    assert install_hint("nltk", ifeval_yaml) == 'install it with: pip install "lm-eval[ifeval]"'
    assert install_hint("nltk") == "install it with: pip install nltk"   # in two extras: the package
    assert install_hint("antlr4") == 'install it with: pip install "lm-eval[math]"'   # import name != package
    assert install_hint("sklearn.metrics") == "install it with: pip install scikit-learn"
    assert install_hint("some_unknown_mod") == "install it with: pip install some_unknown_mod"


def test_task_yaml_is_loaded_strictly(tmp_path):
    duplicate = task_file(tmp_path / "a", "dup.yaml", "dup", "test_split: train\n")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("task: bomb\na: &a [x, x, x, x, x, x, x, x, x, x]\n"
                    + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
                              f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
                              f"*{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9)))
    started = time.perf_counter()
    _, problems = check_task_entries([str(duplicate), str(bomb)], [tmp_path])
    assert time.perf_counter() - started < 1
    assert problems[0] == (0, f"{duplicate}:9: test_split: duplicate key (first at line 5); a key may appear once")
    assert problems[1][0] == 1 and "alias bomb" in problems[1][1]


def test_function_module_that_is_neither_beside_the_task_nor_installed_is_reported(tmp_path):
    path = task_file(tmp_path, "t.yaml", "t", "process_docs: !function helperz.process\n")
    _, problems = check_task_entries([str(path)], [tmp_path])
    assert problems == [(0, f"{path}: !function helperz.process: no helperz.py beside the file, "
                            "and no installed module 'helperz'")]


# ---------------------------------------------------------------- data sources that never end


@pytest.fixture
def never_ending(tmp_path):
    """A FIFO (reading it blocks) and a link named like data to /dev/zero (it never ends)."""
    import os

    os.mkfifo(tmp_path / "fifo.jsonl")
    (tmp_path / "z.jsonl").symlink_to("/dev/zero")
    return tmp_path


@pytest.mark.parametrize("name, kind", [("fifo.jsonl", "a named pipe (FIFO)"), ("z.jsonl", "a character device")])
def test_a_data_source_that_is_not_a_regular_file_is_refused_at_validate_and_load(never_ending, repo, name, kind):
    from posttrain.data.io import load_examples
    from posttrain.errors import DataError

    recipe = write(never_ending, [str(repo / "evals/skills_mc.yaml")], source=name)
    result = invoke("validate", recipe)
    assert result.exit_code == 2
    assert f"pre.yaml:5: data.ins.source: data source is {kind}, not a regular file: {never_ending / name}" \
        in result.output
    with pytest.raises(DataError, match=re.escape(f"is {kind}, not a regular file")):
        load_examples(name, base_dir=never_ending)   # the loader itself refuses, before opening


def test_an_eval_task_data_file_that_is_not_a_regular_file_is_refused(never_ending):
    task = task_file(never_ending / "evals", "t.yaml", "t")
    (never_ending / "evals" / "rows.jsonl").unlink()
    (never_ending / "evals" / "rows.jsonl").symlink_to(never_ending / "fifo.jsonl")
    result = invoke("validate", write(never_ending, [str(task)]))
    assert result.exit_code == 2
    assert f"data file is a named pipe (FIFO), not a regular file: {never_ending / 'fifo.jsonl'}" in result.output


def test_a_recipe_that_is_not_a_regular_file_is_refused(never_ending):
    result = invoke("validate", never_ending / "fifo.jsonl")
    assert result.exit_code == 2 and "fifo.jsonl: not a regular file (a recipe is a YAML file)" in result.output


def test_data_rows_with_numbers_json_refuses_are_bad_rows(tmp_path):
    """json.loads raises ValueError (not JSONDecodeError) past 4,300 digits: it was a traceback."""
    from posttrain.data.io import load_examples
    from posttrain.errors import DataError

    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]'
    (tmp_path / "d.jsonl").write_text(f'{good}, "n": {"1" * 5000}}}\n{good}}}\n')
    with pytest.raises(DataError) as info:
        load_examples("d.jsonl", base_dir=tmp_path)
    assert info.value.problems == ["d.jsonl:1: holds a number of more than 4,300 digits, which Python's JSON reader "
                                   "refuses"]
    assert len(load_examples("d.jsonl", base_dir=tmp_path, on_bad_rows="skip").examples) == 1
    (tmp_path / "d.json").write_text(f'[{good}, "n": {"1" * 5000}}}]')
    with pytest.raises(DataError, match="d.json: holds a number of more than 4,300 digits"):
        load_examples("d.json", base_dir=tmp_path)


# ---------------------------------------------------------------- max_length that leaves nothing to train


def tiny(tmp_path, repo, *overrides):
    from tiny_recipes import write_recipe

    return [write_recipe(tmp_path, repo), *(arg for o in overrides for arg in ("-o", o))]


@pytest.mark.parametrize("pipeline, override, what", [
    ("[sft, dpo]", "stages.dpo.max_length=2", "64 pairs of data 'prefs' would be dropped before training: the "
                                              "prompt alone fills max_length (2 tokens; the shortest such prompt "
                                              "takes 44)"),
    ("[sft, orpo]", "stages.orpo.max_length=44", "64 pairs of data 'prefs' would be dropped before training: the "
                                                 "prompt alone fills max_length (44 tokens; the shortest such "
                                                 "prompt takes 44)"),
    ("[sft]", "stages.sft.max_length=43", "64 conversations of data 'ins' would be dropped before training: the "
                                          "prompt before the first reply fills max_length (43 tokens; the shortest "
                                          "such prompt takes 43)"),
])
def test_a_stage_whose_max_length_leaves_nothing_to_train_fails_before_any_stage_trains(
        tmp_path, repo, isolated_cache, pipeline, override, what):
    """DPO raised `torch.cat(): expected a non-empty list` and SFT `num_samples=0` (tracebacks),
    ORPO a clean error: each only after the stages before it had trained."""
    stage = override.split(".")[1]
    out = tmp_path / "run"
    result = invoke("run", *tiny(tmp_path, repo, f"pipelines={{p: {pipeline}}}", override), "--out", out)
    assert result.exit_code == 2, result.output
    assert f"  stages.{stage}.max_length: every one of the {what}, leaving nothing to train on. Raise max_length " \
           "above" in result.output
    assert_nothing_trained(isolated_cache)


def test_a_stage_that_loses_some_rows_to_max_length_is_counted_in_the_plan(tmp_path, repo):
    result = invoke("plan", *tiny(tmp_path, repo, "pipelines={p: [sft, dpo]}", "stages.dpo.max_length=60"))
    assert result.exit_code == 0, result.output
    assert ("stages.dpo: 16 of 64 pairs (25.0%) will be dropped before training: the prompt alone fills max_length "
            "(60 tokens)") in result.output
    assert "stages.sft:" not in result.output   # max_length 96 keeps every conversation




@pytest.mark.parametrize("template", ["chatml", "plain+bos"])
@pytest.mark.parametrize("method", list(__import__("posttrain.stages", fromlist=["METHODS"]).METHODS))
def test_estimated_drops_are_what_the_trainers_drop(tmp_path, monkeypatch, method, template):
    """At the median first-trained position, for each method's trainer and both SFT masking
    modes (generation markers; prompt-completion) and the BOS ORPO and CPO add: TRL's own
    dataset sizes."""
    import importlib

    from posttrain import models
    from posttrain.data.builtin import instruction_rows, preference_rows
    from posttrain.data.formats import to_kind
    from posttrain.estimate import first_trained_position
    from posttrain.stages import METHODS
    from posttrain.stages.common import StageContext

    if template == "plain+bos":
        real = models.build_char_tokenizer

        def plain_with_bos():
            tokenizer = real()
            tokenizer.chat_template = models.CHATML_TEMPLATE.replace("{% generation %}", "").replace(
                "{% endgeneration %}", "")
            tokenizer.bos_token = "<|endoftext|>"
            return tokenizer

        monkeypatch.setattr(models, "build_char_tokenizer", plain_with_bos)
    chat_template = "chatml" if template == "chatml" else "model"
    tokenizer = models.load_tokenizer(models.ModelSource(name="builtin:micro-llama", chat_template=chat_template))
    models.apply_chat_template_choice(tokenizer, None, chat_template)
    declared = METHODS[method]
    rows = (instruction_rows("train", 24) if declared.data == "instruction"
            else to_kind(preference_rows("train", 24), "preference", declared.data))
    positions = sorted(first_trained_position(row, tokenizer, assistant_masks=models.template_has_generation_markers(
        tokenizer), add_bos=declared.prompt_bos) for row in rows)
    max_length = positions[len(positions) // 2]
    spec = declared.settings(method=method, data="d", learning_rate=1e-3, max_steps=1, batch_size=8,
                             max_length=max_length)
    (tmp_path / "out").mkdir()
    ctx = StageContext(name="s", spec=spec, seed=0, examples=rows, out_dir=tmp_path / "out",
                       start=models.ModelSource(name="builtin:micro-llama", chat_template=chat_template))
    trainer, _ = importlib.import_module(declared.module).build_trainer(ctx)
    assert len(trainer.train_dataset) == sum(p < max_length for p in positions) < len(rows)


def test_sampled_drop_counts_scale_to_the_whole_data():
    from posttrain.estimate import SAMPLE_ROWS, measured_rows, prompt_fill

    assert measured_rows(5) == [0, 1, 2, 3, 4]
    picked = measured_rows(10 * SAMPLE_ROWS)
    assert len(picked) == SAMPLE_ROWS and picked == sorted(set(picked)) and picked == measured_rows(10 * SAMPLE_ROWS)
    fill = prompt_fill([10] * 500 + [100] * 1500, rows=20_000, max_length=50)
    assert (fill.dropped, fill.dropped_rows, fill.shortest, fill.all_dropped) == (1500, 15_000, 10, False)
    assert prompt_fill([60, 70], rows=2, max_length=60).all_dropped
    assert not prompt_fill([], rows=0, max_length=60).all_dropped


def test_rows_a_trainer_drops_are_counted_in_the_stage_record_and_the_report(tmp_path, repo):
    """DPO at max_length 60 drops the 16 of 64 pairs whose prompt fills it (TRL does); ORPO at
    96 keeps all: stage.json counts given and trained rows, the report says so and warns
    that the two pipelines did not train on the same rows."""
    out = tmp_path / "run"
    result = invoke("run", *tiny(tmp_path, repo, "stages.dpo.max_length=60"), "--out", str(out))
    assert result.exit_code == 0, result.output
    records = {json.loads(p.read_text())["stage"]: json.loads(p.read_text())
               for p in (out / "stages").glob("*/stage.json")}
    assert (records["dpo"]["cost"]["rows_given"], records["dpo"]["cost"]["rows_trained"]) == (64, 48)
    assert (records["orpo"]["cost"]["rows_given"], records["orpo"]["cost"]["rows_trained"]) == (64, 64)
    assert records["dpo"]["cost"]["examples_seen"] == 16   # 2 steps x batch 8, of the 48 kept
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert ("Stage dpo trained on 48 of the 64 rows of 'prefs': 16 were dropped before training (the prompt filled "
            "max_length, leaving nothing to train on).") in notes
    warning = next(note for note in notes if note.startswith("Stages given the same 64 rows of 'prefs' trained on "
                                                             "different numbers of them"))
    assert "dpo 48" in warning and "orpo 64" in warning
    assert "16 were dropped before training" in (out / "report.md").read_text()


def test_plan_counts_the_rows_each_stage_will_drop(tmp_path, repo):
    result = invoke("plan", *tiny(tmp_path, repo, "stages.dpo.max_length=60", "compare.match=tokens"), "--json")
    assert result.exit_code == 0, result.output
    rows = {row["stage"]: row for row in json.loads(result.stdout)["stages"]}
    assert (rows["dpo"]["examples"], rows["dpo"]["dropped"]) == (64, 16)
    assert rows["sft"]["dropped"] == 0 and rows["orpo"]["dropped"] == 0
    text = invoke("plan", *tiny(tmp_path, repo, "stages.dpo.max_length=60"))
    assert "64 (16 dropped)" in text.output


def test_nltk_data_a_task_needs_is_checked_before_its_module_tries_to_download_it(tmp_path, monkeypatch):
    """IFEval's module looks up (and at import downloads) NLTK's punkt_tab; offline that
    download fails and the task breaks mid-evaluation. Named before training instead."""
    pytest.importorskip("nltk")
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "no-nltk-data"))
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no-nltk-data")])
    path = task_file(tmp_path / "t", "t.yaml", "needs_punkt", "process_docs: !function helper.docs\n")
    (tmp_path / "t" / "helper.py").write_text(
        "import nltk\ntry:\n    nltk.data.find('tokenizers/punkt_tab')\nexcept LookupError:\n"
        "    assert nltk.download('punkt_tab') is False, 'a check downloaded'\n\ndef docs(d):\n    return d\n")
    problems = [message for _, message in task_problems([TaskRef(name="needs_punkt", path=path)], task_dir=None)]
    assert ("task 'needs_punkt' needs NLTK data that is not installed: punkt_tab; "
            "run once online: python -m nltk.downloader punkt_tab") in problems, problems
