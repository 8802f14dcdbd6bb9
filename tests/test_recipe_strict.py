"""Strict recipes (issue 11): strict YAML, names that become paths, finite and bounded
numbers, builtin names, malformed overrides. No torch; most cases validate a mapping."""

import copy
import math
import random
import string
import textwrap
import time
import tracemalloc
import typing
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from pydantic import BaseModel

from posttrain.recipe import references
from posttrain.artifacts import Area
from posttrain.recipe.load import load_recipe, validate_recipe
from posttrain.recipe.fields import INT_MAX
from posttrain.recipe.schema import Recipe
from posttrain.errors import DataError, PosttrainError, RecipeError
from posttrain.recipe import yamlfile
from posttrain.recipe.yamlfile import YAML_MAX_ALIAS_NODES, YAML_MAX_BYTES, dotted, line_index, strict_yaml_load

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
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

BOMB = "name: bomb\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{level}: &{level} [{', '.join([f'*{previous}'] * 9)}]\n" for previous, level in zip("abcdefgh", "bcdefghi"))


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else textwrap.dedent(text).encode())
    return path


def problems_of(path, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return [str(info.value), *info.value.problems]


# ---------------------------------------------------------------- strict YAML


def test_duplicate_keys_at_any_depth_name_both_lines(tmp_path):
    text = GOOD.replace("learning_rate: 1.0e-3}", "learning_rate: 1.0e-3, learning_rate: 5.0}") + textwrap.dedent("""\
        name: again
        report:
          baseline: sft
          baseline: sft+dpo
        """)
    problems = problems_of(write(tmp_path, text))
    assert "recipe.yaml:7: stages.sft.learning_rate: duplicate key (first at line 7); a key may appear once" in problems
    assert "recipe.yaml:13: name: duplicate key (first at line 1); a key may appear once" in problems
    assert "recipe.yaml:16: report.baseline: duplicate key (first at line 15); a key may appear once" in problems
    assert problems[0] == "recipe.yaml: 3 problem(s)"


def test_alias_bomb_is_refused_within_a_second_in_bounded_memory(tmp_path):
    path = write(tmp_path, BOMB)
    start = time.perf_counter()
    problems = problems_of(path)
    assert time.perf_counter() - start < 1.0  # about 0.1 s; it used 3 GB in 33 s before
    tracemalloc.start()
    try:
        problems_of(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64e6
    assert f"aliases expand the document by more than {YAML_MAX_ALIAS_NODES:,} values (an alias bomb?)" in problems[0]
    assert problems[0].startswith("recipe.yaml:")


@pytest.mark.parametrize("text, message", [
    ("name: x\na: &x [*x]\n", "recipe.yaml:2: alias *x is inside its own anchor &x (a recursive alias)"),
    ("a: &x {b: {c: *x}}\n", "recipe.yaml:1: alias *x is inside its own anchor &x (a recursive alias)"),
    ("a: *nope\n", "recipe.yaml:1: alias *nope has no anchor &nope before it"),
    ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", "recipe.yaml:1: not valid YAML"),
    ("".join(" " * i + f"k{i}:\n" for i in range(150)) + " " * 150 + "v: 1\n",
     "recipe.yaml:101: nested more than 100 levels deep"),
    ("a: &a " + "[" * 60 + "]" * 60 + "\nb: " + "[" * 50 + "*a" + "]" * 50 + "\n",
     "recipe.yaml:2: alias *a nests the document more than 100 levels deep"),
    ("name: x\n---\nname: y\n", "recipe.yaml:2: several YAML documents (---); one is expected"),
    ("name: [unclosed\n", "recipe.yaml:2: not valid YAML: while parsing a flow sequence"),
    ("name: a\x00b\n", "recipe.yaml:1: not valid YAML: unacceptable character #x0000"),
    ("- just\n- a list\n", "recipe.yaml: a recipe is a mapping"),
    ("", "recipe.yaml: a recipe is a mapping"),
])
def test_hostile_documents_get_a_message(tmp_path, text, message):
    assert problems_of(write(tmp_path, text))[0].startswith(message)


JINJA_HINT = ("; a Jinja template in YAML needs quotes ('{{ ... }}', with ' doubled inside) or a block scalar "
              "(key: | and the template on the next lines, indented)")


@pytest.mark.parametrize("template, message", [
    ("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
     "recipe.yaml:4: not valid YAML: while parsing a block mapping did not find expected key"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "recipe.yaml:4: not valid YAML: while scanning"),
    ("{{ messages }}", "recipe.yaml:4: model.chat_template: a key must be a plain value, not a list or a mapping"),
])
def test_an_unquoted_jinja_template_says_how_to_write_one(tmp_path, template, message):
    """A chat template pasted as is: YAML reads `{{` as a mapping and refuses `{%`."""
    problems = problems_of(write(tmp_path, f"name: t\nmodel:\n  name: builtin:micro-llama\n  chat_template: {template}\n"))
    assert any(problem.startswith(message) and problem.endswith(JINJA_HINT) for problem in problems), problems
    assert JINJA_HINT not in problems_of(write(tmp_path, "name: [unclosed\n"))[0]


def test_not_utf8_is_a_message_with_its_line(tmp_path):
    path = write(tmp_path, GOOD.encode() + b"# caf\xe9\n")
    assert problems_of(path) == ["recipe.yaml:13: not UTF-8 text (byte 0xe9 at offset 350); save the file as UTF-8"]
    assert load_recipe(write(tmp_path, b"\xef\xbb\xbf" + GOOD.encode())).name == "t"  # a BOM is fine


def test_over_a_megabyte_is_refused_unread(tmp_path):
    path = write(tmp_path, GOOD + "# " + "x" * YAML_MAX_BYTES + "\n")
    start = time.perf_counter()
    assert problems_of(path) == ["recipe.yaml: over 1,000,000 bytes; a YAML file here is at most that"]
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("text, message", [
    ("a: !!python/object:os.system ls\n", "recipe.yaml:1: a: unsupported tag '!!python/object:os.system'"),
    ("a: !!set {x, y}\n", "recipe.yaml:1: a: unsupported tag 'tag:yaml.org,2002:set'"),
    ("a: !!int twelve\n", "recipe.yaml:1: a: not a valid int: 'twelve'"),
    ("? [a, b]\n: 1\n", "recipe.yaml:1: (top): a key must be a plain value, not a list or a mapping"),
    ("b: &k [1]\nc: {*k : 1}\n", "recipe.yaml:2: c: a key must be a plain value, not a list or a mapping"),
    ("a: {<<: [1, 2]}\n", "recipe.yaml:1: a: a merge (<<) takes a mapping or a list of mappings"),
])
def test_tags_keys_and_merges_that_safe_yaml_refuses(tmp_path, text, message):
    problems = problems_of(write(tmp_path, text))
    assert any(problem.startswith(message.replace("!!python", "tag:yaml.org,2002:python"))
               or problem.startswith(message) for problem in problems), problems


TRICKY = """\
base: &base {lr: 1.0e-3, sizes: [1, 2], nested: {x: 1}}
merged:
  <<: *base
  lr: 2.0e-3
multi: {<<: [{p: 1, q: 0}, {p: 2, r: 3}], s: 4}
numbers: [0, -0, +5, 0755, 0x1f, 1_000, 1:30, 1.5, -1.0e-3, 1e3, .5, .inf, -.inf, 0o17, 1.0E+5]
words: [yes, No, on, off, ~, null, "1", '2', !!str 3, 2001-12-14, 2001-12-14t21:59:43.10-05:00]
binary: !!binary aGVsbG8=
block: |
  two
  lines
folded: >
  one
  line
? complex key
: value
"""


@pytest.mark.parametrize("text", [TRICKY, *(p.read_text() for p in sorted((REPO / "recipes").glob("*.yaml")))],
                         ids=lambda text: text.splitlines()[0][:20])
def test_loads_what_safe_load_loads(text):
    data, _ = strict_yaml_load(text, "x.yaml")
    expected = yaml.safe_load(text)
    assert repr(data) == repr(expected)  # repr: nan-safe, and key order counts


ALIASED = """\
name: t
model: {name: builtin:micro-llama}
data: {ins: {source: builtin:skills}, prefs: {source: builtin:skills-preferences}}
stages:
  sft: &s
    method: sft
    data: ins
    learning_rate: 1.0e-3
  sft2: *s
  dpo:
    <<: {method: dpo, data: prefs, learning_rate: 1.0e-4}
    beta: 0.1
  orpo:
    <<: {method: orpo, data: prefs, learning_rate: 1.0e-3}
pipelines: {sft: [sft], two: [sft2], sft+dpo: [sft, dpo], orpo: [orpo]}
eval: {tasks: [evals/skills_exact.yaml]}
"""


def test_aliases_are_copies_and_keep_their_lines(tmp_path):
    path = write(tmp_path, ALIASED)
    recipe = load_recipe(path, ["stages.sft2.learning_rate=0.5"])
    assert (recipe.stages["sft"].learning_rate, recipe.stages["sft2"].learning_rate) == (1.0e-3, 0.5)
    assert "recipe.yaml:8: stages.sft2.learning_rate: must be > 0.0" in problems_of(
        path, ["stages.sft.learning_rate=-1", "stages.sft2.learning_rate=-1"])  # the anchor's line
    _, lines = strict_yaml_load(ALIASED, "x")
    assert lines[("stages", "sft2")] == 9 and lines[("stages", "sft2", "learning_rate")] == 8


def test_merged_keys_are_placed_at_the_merge(tmp_path):
    text = ALIASED.replace("beta: 0.1", "beta: -1").replace("learning_rate: 1.0e-3}", "learning_rate: .nan}")
    problems = problems_of(write(tmp_path, text))
    assert problems[1:] == ["recipe.yaml:12: stages.dpo.beta: must be > 0.0",
                            "recipe.yaml:14: stages.orpo.learning_rate: must be a finite number (not .inf or .nan)"]


def test_tags_are_pluggable_for_lm_eval_task_yamls():
    text = "task: t\nprocess_results: !function utils.process\nlist: !pair [1, 2]\n"
    data, lines = strict_yaml_load(text, "task.yaml", tags={"!function": lambda value: ("function", value),
                                                           "!pair": tuple})
    assert data == {"task": "t", "process_results": ("function", "utils.process"), "list": (1, 2)}
    assert lines[("process_results",)] == 2
    with pytest.raises(DataError) as info:  # the caller picks the error class
        strict_yaml_load(text, "task.yaml", error=DataError)
    assert "task.yaml:2: process_results: unsupported tag '!function'" in info.value.problems


def test_line_index_never_raises():
    assert line_index("a: [unclosed") == {}
    assert line_index(BOMB) == {}
    assert line_index("a:\n  b: 1\n") == {("a",): 1, ("a", "b"): 2}


def test_a_megabyte_of_bad_entries_is_validated_quickly_and_reported_briefly(tmp_path):
    body = "".join(f"  p{i}: [x{i}, sft, sft]\n" for i in range(30_000))
    path = write(tmp_path, GOOD.replace("pipelines:\n", "pipelines:\n" + body))
    assert path.stat().st_size < YAML_MAX_BYTES
    start = time.process_time()
    problems = problems_of(path)
    assert time.process_time() - start < 5  # about 0.5 s; a quadratic step would take minutes
    assert problems[0] == "recipe.yaml: 60000 problem(s)"
    assert len(problems) == 1 + yamlfile.PROBLEMS_SHOWN + 1 and problems[-1] == "... and 59900 more"
    assert problems[1] == "recipe.yaml:10: pipelines.p0[0]: unknown stage 'x0' (known: sft, dpo)"


# ---------------------------------------------------------------- names that become paths


def generated_names() -> list:
    crafted = ["..", ".", "...", "../x", "a/../b", "x/..", "/", "/etc", "/tmp/x", "a/b", "a\\b", "\\", "C:\\x",
               "\x00", "a\x00b", " ", " a", "a ", "\t", "a\nb", "é", "日本", "\u202egpj.exe", "a\u200bb", "ﬁ",
               "Ａ", "~", "~root", "$HOME", "%2e%2e", "-rf", "--", "+x", "=", "[", "]", ",", "@", "a" * 120,
               "a" * 121, "a" * 5000, "", "con", "a:b", "a*b", "a?b", '"', "'", "`", "|", ";", "&", "ok_name",
               "a.b", "a..b", ".hidden", "x.", "_", "0", "sft[beta=0.1]", 1, 0.5, True, None]
    rng = random.Random(11)
    alphabet = string.printable + "éß日本\u202e\u200b\x00\x7f/\\..."
    randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 130))) for _ in range(150)]
    safe = ["".join(rng.choice(string.ascii_letters + string.digits + "_.+-=,[]@") for _ in range(rng.randint(1, 20)))
            for _ in range(50)]
    return crafted + randoms + safe


def recipe_naming(kind: str, name) -> dict:
    raw = yaml.safe_load(GOOD)
    if kind == "data":
        raw["data"][name] = raw["data"].pop("ins")
        raw["stages"]["sft"]["data"] = name
    elif kind == "stages":
        raw["stages"][name] = raw["stages"].pop("sft")
        raw["pipelines"] = {"sft": [name], "sft+dpo": [name, "dpo"]}
    elif kind == "pipelines":
        raw["pipelines"][name] = raw["pipelines"].pop("sft")
    else:
        raw["external"] = {name: "org/model"}
    return raw


@pytest.mark.parametrize("kind", references.PATH_NAME_SECTIONS)
def test_every_name_is_refused_or_stays_inside_its_root(tmp_path, kind):
    area, accepted, refused = Area(tmp_path), 0, 0
    for name in generated_names():
        try:
            validate_recipe(recipe_naming(kind, name), "recipe.yaml")
        except RecipeError as exc:
            refused += 1
            assert any(f"{dotted((kind, name))}: " in problem and "a name is 1-120 characters" in problem
                       for problem in exc.problems), (name, exc.problems)
            continue
        accepted += 1
        path = area.path(name)
        assert path.parent == area.root.resolve() and path.name == name
    assert accepted > 50 and refused > 150


@pytest.mark.parametrize("name", ["..", "a/b", "/abs", "x" * 121, "é", "a..b"])
def test_the_recipe_name_names_the_run_directory(tmp_path, name):
    raw = {**yaml.safe_load(GOOD), "name": name}
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, "recipe.yaml")
    assert info.value.problems[0].startswith("recipe.yaml: name: ")


def test_names_the_sweep_makes_are_checked(tmp_path):
    long_stage, long_pipeline = "s" * 110, "p" * 115
    text = GOOD.replace("  sft: {method", f"  {long_stage}: {{method").replace("[sft]", f"[{long_stage}]")
    text = text.replace("sft+dpo: [sft, dpo]", f"{long_pipeline}: [{long_stage}, dpo]")
    problems = problems_of(write(tmp_path, text), [f"sweep.stages.{long_stage}.learning_rate=[1.0e-3, 2.0e-3]"])
    assert len(problems) == 3 and all("a name is 1-120 characters" in problem for problem in problems[1:])
    assert problems[1].startswith(f"recipe.yaml: sweep.stages.{long_stage}.learning_rate[0]: '0.001' cannot be "
                                  "part of the stage name it makes: 'sss")
    problems = problems_of(write(tmp_path, text.replace(long_stage, "sft")), ["sweep.stages.dpo.beta=[0.1, 0.2]"])
    assert problems[1].startswith(f"recipe.yaml: sweep: a pipeline the sweep makes: '{long_pipeline[:57]}...' is "
                                  "not a valid name")


# ---------------------------------------------------------------- numbers

FULL = yaml.safe_load(GOOD)
FULL["model"]["lora"] = {"r": 4}
FULL["data"]["ins"]["curate"] = {"select": {"strategy": "random", "n": 10}}
FULL["data"]["mixed"] = {"mix": [{"data": "ins", "weight": 1.0}], "size": 10}
for _method in ("orpo", "kto", "cpo", "simpo"):
    FULL["stages"][_method] = {"method": _method, "data": "prefs", "learning_rate": 1.0e-3}
    FULL["pipelines"][_method] = [_method]
FULL["eval"]["preferences"] = {"source": "builtin:skills-preferences", "split": "test"}
FULL.update(output={}, report={}, tracking={"wandb": {}}, compare={"match": "tokens"}, resources={"prepare": {}})
# Where each spec of the schema sits in FULL: a new spec must be added here.
SPEC_PATHS = {"Recipe": (), "ModelSpec": ("model",), "LoraSpec": ("model", "lora"), "DataSpec": ("data", "ins"),
              "CurateSpec": ("data", "ins", "curate"), "SelectSpec": ("data", "ins", "curate", "select"),
              "MixPart": ("data", "mixed", "mix", 0), "SFTStage": ("stages", "sft"), "DPOStage": ("stages", "dpo"),
              "ORPOStage": ("stages", "orpo"), "KTOStage": ("stages", "kto"), "CPOStage": ("stages", "cpo"),
              "SimPOStage": ("stages", "simpo"), "EvalSpec": ("eval",), "OutputSpec": ("output",),
              "ReportSpec": ("report",), "CompareSpec": ("compare",), "TrackingSpec": ("tracking",),
              "WandbSpec": ("tracking", "wandb"), "ClusterResources": ("resources",),
              "ResourcesSpec": ("resources", "prepare")}


def leaf_types(annotation) -> set:
    args = typing.get_args(annotation)
    return {annotation} if not args else set().union(*(leaf_types(arg) for arg in args))


def schema_fields(number_type: type):
    """(spec class, field, is a list) for every field of every spec holding `number_type`."""
    seen, todo = set(), [Recipe]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            leaves = leaf_types(field.annotation) | set().union(*(leaf_types(m) for m in field.metadata))
            todo += [leaf for leaf in leaves if isinstance(leaf, type) and issubclass(leaf, BaseModel)]
            if number_type in leaves:
                yield model, name, typing.get_origin(field.annotation) is list


def set_at(raw: dict, path: tuple, value) -> dict:
    raw = copy.deepcopy(raw)
    node = raw
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return raw


def test_the_full_recipe_is_valid():
    validate_recipe(copy.deepcopy(FULL), "full.yaml")


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, 10**400])
def test_no_float_setting_takes_inf_or_nan(bad):
    fields = list(schema_fields(float))
    assert len(fields) >= 15
    for model, name, is_list in fields:
        path = (*SPEC_PATHS[model.__name__], name)
        raw = set_at(FULL, path, [bad] if is_list else bad)
        with pytest.raises(RecipeError) as info:
            validate_recipe(raw, "full.yaml")
        text = "\n".join(info.value.problems)
        assert f"{dotted(path)}" in text and ("finite number" in text or "Input should be" in text), (path, text)


@pytest.mark.parametrize("bad", [INT_MAX + 1, 10**30, -(10**30)])
def test_every_int_setting_is_bounded(bad):
    fields = list(schema_fields(int))
    assert len(fields) >= 20
    for model, name, is_list in fields:
        path = (*SPEC_PATHS[model.__name__], name)
        raw = set_at(FULL, path, [bad] if is_list else bad)
        with pytest.raises(RecipeError) as info:
            validate_recipe(raw, "full.yaml")
        assert any(dotted(path) in problem and ("must be <=" in problem or "must be >" in problem)
                   for problem in info.value.problems), (path, info.value.problems)


def test_seeds_are_what_numpy_and_set_seed_accept(tmp_path):
    path = write(tmp_path, GOOD)
    assert load_recipe(path, [f"seeds=[0, {2**32 - 1}]"]).seeds == [0, 2**32 - 1]
    problems = problems_of(path, [f"seeds=[-1, {2**32}, 7]", "stages.sft.seed=-5", f"stages.dpo.seed={2**64}"])
    assert problems[1:] == ["recipe.yaml: seeds[0]: must be >= 0", "recipe.yaml: seeds[1]: must be <= 4294967295",
                            "recipe.yaml:7: stages.sft.seed: must be >= 0",
                            "recipe.yaml:8: stages.dpo.seed: must be <= 4294967295"]


def test_epochs_inf_in_the_file(tmp_path):
    text = GOOD.replace("learning_rate: 1.0e-3}", "learning_rate: .inf, epochs: .inf}")
    problems = problems_of(write(tmp_path, text))
    assert problems[1:] == ["recipe.yaml:7: stages.sft.learning_rate: must be a finite number (not .inf or .nan)",
                            "recipe.yaml:7: stages.sft.epochs: must be a finite number (not .inf or .nan)"]


@pytest.mark.parametrize("path, value, message", [
    (("model", "name"), "", "model.name: must not be empty"),
    (("data", "ins", "split"), "", "data.ins.split: must not be empty"),
    (("data", "ins", "source"), "", "data.ins.source: must not be empty"),
    (("eval", "tasks"), ["evals/skills_exact.yaml", ""], "eval.tasks[1]: must not be empty"),
    (("model", "name"), "./mod\x00el", "model.name: './mod\\x00el' contains a NUL character"),
    (("eval", "tasks"), ["a\x00b"], "eval.tasks: 'a\\x00b' contains a NUL character"),
    (("external",), {"x": "a\x00b"}, "external: 'a\\x00b' contains a NUL character"),
])
def test_empty_ids_and_nul_characters(path, value, message):
    with pytest.raises(RecipeError) as info:
        validate_recipe(set_at(yaml.safe_load(GOOD), path, value), "recipe.yaml")
    assert info.value.problems == [f"recipe.yaml: {message}"]


# ---------------------------------------------------------------- builtin data


@pytest.mark.parametrize("change, message", [
    ("ins: {source: builtin:skills, split: tset}", "recipe.yaml:4: data.ins.split: builtin:skills has no split 'tset' "
                                                   "(splits: train, test)"),
    ("ins: {source: builtin:skills, format: preference}", "recipe.yaml:4: data.ins.format: builtin:skills is in the "
                                                          "messages format; use format: messages (or auto)"),
    ("ins: {source: builtin:skillz}", "recipe.yaml:4: data.ins.source: unknown builtin dataset 'builtin:skillz'"),
    ("ins: {source: builtin:skills-noisy, split: test}", "recipe.yaml:4: data.ins.split: builtin:skills-noisy has "
                                                         "no split 'test' (splits: train)"),
    ("prefs: {source: builtin:skills-noisy}", "recipe.yaml:8: stages.dpo.data: dpo needs preference data"),
])
def test_builtin_datasets_splits_and_formats_at_validate(tmp_path, change, message):
    key = change.split(":")[0]
    line = next(line for line in GOOD.splitlines() if line.strip().startswith(f"{key}:"))
    problems = problems_of(write(tmp_path, GOOD.replace(line, f"  {change}")))
    assert any(problem.startswith(message) for problem in problems), problems


def test_eval_preferences_split_is_checked(tmp_path):
    text = GOOD.replace("eval: {tasks: [evals/skills_exact.yaml]}",
                        "eval:\n  tasks: [evals/skills_exact.yaml]\n"
                        "  preferences: {source: builtin:skills-preferences, split: valid}")
    assert problems_of(write(tmp_path, text))[1] == (
        "recipe.yaml:14: eval.preferences.split: builtin:skills-preferences has no split 'valid' (splits: train, test)")


def test_builtin_data_refuses_an_unknown_split_at_the_source():
    from posttrain.data.builtin import BUILTIN_SPLITS, generate_items
    from posttrain.data.sources import BUILTIN_DATASETS

    assert set(BUILTIN_DATASETS) == set(BUILTIN_SPLITS)
    for name, rows in BUILTIN_DATASETS.items():
        with pytest.raises(DataError, match=f"builtin:{name} has no split 'tset'"):
            rows(split="tset")
        assert set(BUILTIN_SPLITS[name]) <= {"train", "test"}
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        generate_items("valid", 4)
    assert len(BUILTIN_DATASETS["skills"](split="test", n=3)) == 3


# ---------------------------------------------------------------- overrides


@pytest.mark.parametrize("override, message", [
    ("=1", "-o =1: the key '' has an empty part"),
    ("a..b=1", "-o a..b=1: the key 'a..b' has an empty part"),
    ("stages.sft.=1", "-o stages.sft.=1: the key 'stages.sft.' has an empty part"),
    ("name", "-o name: expected dotted.key=value"),
    ("seeds.0=1", "-o seeds.0=1: seeds is a list, not a mapping: it has no key '0'; "
                  "set the whole list (-o 'seeds=[...]')"),
    ("name.x=1", "-o name.x=1: name is str 't', not a mapping: it has no key 'x'"),
    ("stages.sft.learning_rate.x.y=1", "-o stages.sft.learning_rate.x.y=1: stages.sft.learning_rate is float 0.001"),
    ("stages.sft.learning_rate=[1", "-o stages.sft.learning_rate=[1: the value is not valid YAML (while parsing"),
    ("eval.tasks={a: 1, a: 2}", "-o eval.tasks={a: 1, a: 2}: the value is not valid YAML (a: duplicate key"),
    ("name=*x", "-o name=*x: the value is not valid YAML (alias *x has no anchor &x before it)"),
    ("name=a: b: c", "-o name=a: b: c: the value is not valid YAML (mapping values are not allowed"),
    ("name=@x", "-o name=@x: the value is not valid YAML"),
])
def test_malformed_overrides_name_themselves(tmp_path, override, message):
    problems = problems_of(write(tmp_path, GOOD + "seeds: [0, 1]\n"), [override])
    assert problems[0] == "recipe.yaml: bad override(s)"
    assert problems[1].startswith(message), problems


def test_every_bad_override_is_reported_at_once_and_nulls_become_mappings(tmp_path):
    path = write(tmp_path, GOOD + "seeds: [0, 1]\n")
    assert len(problems_of(path, ["=1", "name", "seeds.0=1", "x=[", "stages.dpo.beta=0.2"])) == 1 + 4
    assert load_recipe(path, ["model.lora.r=8"]).model.lora.r == 8  # lora: null -> a mapping


def test_cli_validate_prints_hostile_input_without_a_traceback(tmp_path):
    bomb, bad_bytes = write(tmp_path, BOMB, "bomb.yaml"), write(tmp_path, b"name: \xff\n", "bytes.yaml")
    result = CliRunner().invoke(main_cli(), ["validate", str(bomb), str(bad_bytes), "-o", "a..b=1"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert "bomb.yaml:" in result.output and "bytes.yaml:1: not UTF-8 text" in result.output


def main_cli():
    from posttrain.cli import main

    return main


def test_pyyaml_errors_never_escape(tmp_path):
    """Whatever the bytes, load_recipe raises a PosttrainError or returns (a fuzz over mutations)."""
    rng = random.Random(3)
    source = GOOD.encode() + b"x: &x [1, 2]\ny: *x\nz: {<<: {a: 1}}\n"
    for _ in range(300):
        data = bytearray(source)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(data))
            data[i:i + 1] = bytes([rng.choice(b"[]{}:&*!<>-? \n\t'\"#|\\%@`,\x00\xff" + bytes(range(97, 123)))])
        try:
            load_recipe(write(tmp_path, bytes(data)))
        except PosttrainError:
            pass


# ---------------------------------------------------------------- numbers too long to convert


@pytest.mark.parametrize("scalar", ["1" * 5000, "-" + "9" * 4301, "0x" + "f" * 5000, "1_" + "0" * 5000])
def test_an_integer_of_thousands_of_digits_is_a_message_with_its_line(tmp_path, scalar):
    """Python refuses int() of more than 4,300 digits: it was a ValueError traceback."""
    problems = problems_of(write(tmp_path, GOOD + f"seeds: [0, {scalar}]\n"))
    assert problems[1] == f"recipe.yaml:13: seeds[1]: a whole number of {len(scalar):,} characters: at most 100 digits here"


def test_an_override_of_thousands_of_digits_is_a_short_message(tmp_path):
    problems = problems_of(write(tmp_path, GOOD), ["seed=" + "9" * 5000])
    assert problems[1] == ("-o seed=" + "9" * 95 + "... (5,005 characters): the value is not valid YAML (a whole number "
                           "of 5,000 characters: at most 100 digits here); quote a string value: -o 'seed=\"...\"'")


def test_numbers_up_to_the_limit_still_load():
    assert strict_yaml_load("a: " + "9" * 100 + "\nb: 0x" + "f" * 98, "t.yaml")[0] == {
        "a": int("9" * 100), "b": int("f" * 98, 16)}


# ---------------------------------------------------------------- names the schema reserves or that collide


@pytest.mark.parametrize("targets", [[], [""], "q_proj", None])
@pytest.mark.parametrize("where", [("model", "lora"), ("stages", "sft", "lora")])
def test_lora_target_modules_must_name_something(targets, where):
    """`target_modules: []` passed validate and plan; peft refused it after training had started."""
    raw = set_at(yaml.safe_load(GOOD), where, {"r": 4, "target_modules": targets})
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, "recipe.yaml")
    assert info.value.problems == [f"recipe.yaml: {dotted(where)}.target_modules: must be all-linear or a non-empty "
                                   "list of module names (e.g. [q_proj, v_proj])"]


def test_stage_lora_errors_are_placed_under_the_key_written():
    raw = set_at(yaml.safe_load(GOOD), ("stages", "sft", "lora"), {"r": -1})
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, "recipe.yaml")
    assert info.value.problems == ["recipe.yaml: stages.sft.lora.r: must be > 0"]   # not lora.LoraSpec.r + literal
    raw = set_at(yaml.safe_load(GOOD), ("stages", "sft", "lora"), True)
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, "recipe.yaml")
    assert info.value.problems[0].startswith("recipe.yaml: stages.sft.lora: must be a mapping of LoRA settings")
    for fine in (False, None, {"r": 4, "target_modules": ["q_proj"]}):
        validate_recipe(set_at(yaml.safe_load(GOOD), ("stages", "sft", "lora"), fine), "recipe.yaml")


def test_a_pipeline_named_base_is_refused(tmp_path):
    """It silently replaced the untrained model's row."""
    problems = problems_of(write(tmp_path, GOOD.replace("  sft: [sft]\n", "  base: [sft]\n")))
    assert problems[1:] == ["recipe.yaml:10: pipelines.base: 'base' is reserved for the untrained model's row "
                            "(and its evals/base folder; `base: []` evaluates it alone); choose another pipeline name"]
    assert load_recipe(write(tmp_path, GOOD.replace("  sft: [sft]\n", "  base: []\n"))).pipelines["base"] == []


CASE = ("differ only in letter case: on case-insensitive filesystems (macOS, Windows) they name the same files; "
        "rename one")


@pytest.mark.parametrize("change, problem", [
    (("stages", "SFT"), "recipe.yaml:8: stages.sft: 'sft' and the stage 'SFT'"),
    (("data", "INS"), "recipe.yaml:5: data.ins: 'ins' and the dataset 'INS'"),
    (("pipelines", "Base"), "recipe.yaml:10: pipelines.Base: 'Base' and the row of the untrained model 'base'"),
    (("pipelines", "SFT"), "recipe.yaml:11: pipelines.sft: 'sft' and the pipeline 'SFT'"),
    (("external", "Sft"), "recipe.yaml:13: external.Sft: 'Sft' and the pipeline 'sft'"),
])
def test_names_that_differ_only_in_case_are_refused(tmp_path, change, problem):
    section, name = change
    text = {"stages": GOOD.replace("stages:\n", "stages:\n  SFT: {method: sft, data: ins, learning_rate: 0.1}\n"),
            "data": GOOD.replace("data:\n", "data:\n  INS: {source: builtin:skills}\n"),
            "pipelines": GOOD.replace("pipelines:\n", f"pipelines:\n  {name}: [sft]\n"),
            "external": GOOD + "external: {Sft: org/model}\n"}[section]
    problems = problems_of(write(tmp_path, text))
    assert problems[1:] == [f"{problem} {CASE}"]


def test_names_the_sweep_makes_that_differ_only_in_case_are_refused(tmp_path):
    text = GOOD.replace("  prefs:", "  INS: {source: builtin:skills, limit: 8}\n  prefs:")
    problems = problems_of(write(tmp_path, text + "sweep: {stages.sft.data: [ins, INS]}\n"))
    assert problems[1] == f"recipe.yaml:5: data.INS: 'INS' and the dataset 'ins' {CASE}"
    assert f"recipe.yaml:14: sweep: the sweep's stage 'sft[data=INS]' and the stage 'sft[data=ins]' {CASE}" in problems
    assert f"recipe.yaml:14: sweep: the sweep's pipeline 'sft[data=INS]' and the pipeline 'sft[data=ins]' {CASE}" \
        in problems
