"""The bad-input table for tests/test_bad_inputs.py: one `Case` per bad input or fault.

Each case names the command to run, the files to create, the exit code the design
asks for (2: the user's mistake, 1: the environment failed) and the places its
message must name (a recipe key, file:line or a path). test_bad_inputs.py runs every
case in-process and also checks that nothing outside the run directory and the cache
changed. Placeholders in commands, files and places: {tmp} (the case's root), {work}
(the cwd, where recipe.yaml lives), {out} (the run directory), {cache}, {repo},
{key}/{key12} (the trained SFT stage's cache key, whole or as `cache ls` shows it),
{line:TEXT} (the number of the recipe line holding TEXT).
A place starting with "re:" is a regular expression.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# The recipe every case starts from; block style so each setting has its own line.
MINI = """\
name: mini
seeds: [0]
model:
  name: builtin:micro-llama
data:
  ins:
    source: builtin:skills
    limit: 32
stages:
  sft:
    method: sft
    data: ins
    learning_rate: 1.0e-2
    max_steps: 2
    batch_size: 8
    max_length: 96
pipelines:
  sft: [sft]
eval:
  tasks: [{repo}/evals/skills_mc.yaml]
  limit: 4
  samples: 0
report:
  resamples: 100
tracking:
  wandb: {mode: disabled}
"""

VALIDATE = ("validate", "{recipe}")
PLAN = ("plan", "{recipe}")
RUN = ("run", "{recipe}", "--out", "{out}", "--no-progress")
FILE_LINE = r"re:recipe\.yaml:\d+"      # the recipe file with a line number


def at_line(text: str) -> str:
    """A place: the number of the recipe line holding `text`, as file:N, "line N" or in a list of lines."""
    return r"re:(?:yaml:|line |lines |, |and )" + "{line:" + text + "}" + r"\b"


@dataclass(frozen=True)
class Case:
    id: str
    area: str                                  # recipe | data | model | eval | rundir | cache
    cmd: tuple[str, ...] = VALIDATE
    recipe: str | bytes | None = MINI          # written to {work}/recipe.yaml
    files: dict = field(default_factory=dict)  # {work}-relative path -> str | bytes
    exit: int | tuple[int, ...] = 2
    place: tuple[str, ...] = ()                # every one must appear in the output
    seeded: bool = False                       # start from a cache holding the trained MINI
    run_dir: bool = False                      # {out} starts as a copy of MINI's finished run
    setup: Callable | None = None              # setup(env): corrupt the cache, plant links
    fault: tuple | None = None                 # ("erofs"|"enospc", "out"|"cache", name filter)
    frozen: tuple[str, ...] = ()               # "out"/"cache": must not change either
    check: Callable | None = None              # check(env, output): case-specific asserts
    subprocess: bool = False                   # run `python -m posttrain` with memory/time limits
    max_s: float | None = None                 # wall-time bound


def mini(*subs: tuple[str, str], append: str = "", base: str = MINI) -> str:
    """MINI with each (old, new) replaced (old must occur exactly once), `append` added."""
    text = base
    for old, new in subs:
        assert text.count(old) == 1, (old, text.count(old))
        text = text.replace(old, new)
    return text + append


def with_dpo(extra: str = "") -> str:
    """MINI plus a preference dataset and an sft -> dpo pipeline; `extra` goes into the dpo stage."""
    return mini(("stages:\n", "  prefs:\n    source: builtin:skills-preferences\n    limit: 32\nstages:\n"),
                ("pipelines:\n  sft: [sft]\n",
                 "  dpo:\n    method: dpo\n    data: prefs\n    learning_rate: 1.0e-3\n    max_steps: 2\n"
                 f"{extra}pipelines:\n  sft: [sft]\n  sft+dpo: [sft, dpo]\n"))


def sft(old: str, new: str, **kw) -> str:
    """MINI with one sft setting line replaced (`old` is the setting's whole text)."""
    return mini((f"    {old}\n", f"    {new}\n"), **kw)


def from_file(source: str, extra: str = "") -> str:
    """MINI whose `ins` dataset is a local file."""
    return mini(("    source: builtin:skills\n    limit: 32\n", f"    source: {source}\n{extra}"))


def tasks(entries: str) -> str:
    return mini(("  tasks: [{repo}/evals/skills_mc.yaml]\n", f"  tasks: [{entries}]\n"))


# ---------------------------------------------------------------- recipe

DUP_LR = sft("max_length: 96", "max_length: 96\n    learning_rate: 5.0")
BOMB = "".join(["name: mini\n", 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'] + [
    f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 10)]) + "seeds: *a9\n"
DEEP = "name: mini\nseeds: " + "[" * 50000 + "]" * 50000 + "\n"

RECIPE = [
    Case("yaml_unclosed_bracket", "recipe", recipe=mini(("  sft: [sft]\n", "  sft: [sft\n")),
         place=(r"re:recipe\.yaml(:| line )\d+|recipe\.yaml.*line \d+",)),
    Case("yaml_tab_indent", "recipe", recipe=mini(("    limit: 32\n", "\tlimit: 32\n")),
         place=(r"re:recipe\.yaml(:| line )\d+|recipe\.yaml.*line \d+",)),
    Case("yaml_mapping_in_scalar", "recipe", recipe=sft("max_steps: 2", "max_steps: 2: 3"),
         place=(r"re:recipe\.yaml(:| line )\d+|recipe\.yaml.*line \d+",)),
    Case("yaml_python_tag", "recipe",
         recipe=mini(("name: mini\n", 'name: !!python/object/apply:os.system ["touch {tmp}/pwned"]\n')),
         place=(r"re:recipe\.yaml(:| line )\d+|recipe\.yaml.*line \d+",)),
    Case("duplicate_key_nested", "recipe", recipe=DUP_LR,
         place=("learning_rate", at_line("learning_rate: 1.0e-2"), at_line("learning_rate: 5.0"))),
    Case("duplicate_key_top", "recipe", recipe=MINI + "seeds: [1]\n",
         place=("seeds", at_line("seeds: [0]"), at_line("seeds: [1]"))),
    Case("duplicate_key_flow_mapping", "recipe",
         recipe=mini(("  wandb: {mode: disabled}\n", "  wandb: {mode: disabled, mode: online}\n")),
         place=("mode", FILE_LINE)),
    Case("duplicate_stage_name", "recipe",
         recipe=mini(("pipelines:\n", "  sft:  # again\n    method: sft\n    data: ins\n    learning_rate: 5.0\n"
                                      "pipelines:\n")),
         place=("sft", at_line("  sft:\n"), at_line("# again"))),
    Case("alias_bomb", "recipe", recipe=BOMB, subprocess=True, max_s=6.0, place=("recipe.yaml",)),
    Case("alias_self_reference", "recipe", recipe=mini(("seeds: [0]\n", "seeds: &s [0, *s]\n")),
         place=("recipe.yaml:2",)),
    Case("nesting_50000_deep", "recipe", recipe=DEEP, subprocess=True, max_s=6.0, place=("recipe.yaml",)),
    Case("not_utf8_latin1", "recipe", recipe=mini(("name: mini\n", "name: mini\n# caf\xe9\n")).encode("latin-1"),
         place=("recipe.yaml",)),
    Case("not_utf8_utf16", "recipe", recipe=MINI.encode("utf-16"), place=("recipe.yaml",)),
    Case("binary_garbage", "recipe", recipe=bytes(range(256)) * 4, place=("recipe.yaml",)),
    Case("empty_file", "recipe", recipe="", place=("recipe.yaml",)),
    Case("top_level_list", "recipe", recipe="- name: mini\n", place=("recipe.yaml",)),
    Case("recipe_missing", "recipe", recipe=None, place=("recipe.yaml",)),
    Case("recipe_is_directory", "recipe", recipe=None, files={"recipe.yaml/x": "x"}, place=("recipe.yaml",)),
    Case("lr_is_text", "recipe", recipe=sft("learning_rate: 1.0e-2", "learning_rate: fast"),
         place=("stages.sft.learning_rate", "recipe.yaml:{line:fast}")),
    Case("epochs_is_list", "recipe", recipe=sft("max_steps: 2", "epochs: [1]"),
         place=("stages.sft.epochs", "recipe.yaml:{line:epochs}")),
    Case("batch_size_fraction", "recipe", recipe=sft("batch_size: 8", "batch_size: 8.5"),
         place=("stages.sft.batch_size", "recipe.yaml:{line:8.5}")),
    Case("model_is_string", "recipe", recipe=mini(("model:\n  name: builtin:micro-llama\n",
                                                    "model: builtin:micro-llama\n")),
         place=("model", "recipe.yaml:{line:model:}")),
    Case("stages_is_list", "recipe", recipe=MINI.replace("stages:\n  sft:\n", "stages:\n  - sft:\n"),
         place=("stages", FILE_LINE)),
    Case("unknown_key", "recipe", recipe=sft("max_steps: 2", "max_step: 2"),
         place=("stages.sft.max_step", "recipe.yaml:{line:max_step:}")),
    Case("lr_inf", "recipe", recipe=sft("learning_rate: 1.0e-2", "learning_rate: .inf"),
         place=("stages.sft.learning_rate", "recipe.yaml:{line:.inf}")),
    Case("lr_overflows_to_inf", "recipe", recipe=sft("learning_rate: 1.0e-2", "learning_rate: 1.0e+400"),
         place=("stages.sft.learning_rate", "recipe.yaml:{line:1.0e+400}")),
    Case("lr_nan", "recipe", recipe=sft("learning_rate: 1.0e-2", "learning_rate: .nan"),
         place=("stages.sft.learning_rate", "recipe.yaml:{line:.nan}")),
    Case("lr_minus_inf", "recipe", recipe=sft("learning_rate: 1.0e-2", "learning_rate: -.inf"),
         place=("stages.sft.learning_rate", "recipe.yaml:{line:-.inf}")),
    Case("epochs_inf", "recipe", recipe=sft("max_steps: 2", "epochs: .inf"),
         place=("stages.sft.epochs", "recipe.yaml:{line:.inf}")),
    Case("epochs_inf_plan", "recipe", cmd=PLAN, recipe=sft("max_steps: 2", "epochs: .inf"),
         place=("stages.sft.epochs",)),
    Case("epochs_huge_plan", "recipe", cmd=PLAN, recipe=sft("max_steps: 2", "epochs: 1.0e+308"),
         place=("stages.sft.epochs",)),
    Case("weight_decay_inf", "recipe", recipe=sft("max_steps: 2", "max_steps: 2\n    weight_decay: .inf"),
         place=("stages.sft.weight_decay", "recipe.yaml:{line:.inf}")),
    Case("max_grad_norm_inf", "recipe", recipe=sft("max_steps: 2", "max_steps: 2\n    max_grad_norm: .inf"),
         place=("stages.sft.max_grad_norm", "recipe.yaml:{line:.inf}")),
    Case("warmup_ratio_nan", "recipe", recipe=sft("max_steps: 2", "max_steps: 2\n    warmup_ratio: .nan"),
         place=("stages.sft.warmup_ratio", "recipe.yaml:{line:.nan}")),
    Case("dpo_beta_inf", "recipe", recipe=with_dpo("    beta: .inf\n"),
         place=("stages.dpo.beta", "recipe.yaml:{line:.inf}")),
    Case("dpo_loss_trl_cannot_build", "recipe", recipe=with_dpo("    loss_type: exo_pair\n"),
         place=("stages.dpo.loss_type", "label smoothing", "recipe.yaml:{line:exo_pair}")),
    Case("sweep_value_inf", "recipe", recipe=MINI + "sweep:\n  stages.sft.learning_rate: [1.0e-2, .inf]\n",
         place=("sweep", "learning_rate", "recipe.yaml:{line:.inf}")),
    Case("curate_threshold_nan", "recipe",
         recipe=mini(("    limit: 32\n", "    limit: 32\n    curate: {dedup: near, near_dup_threshold: .nan}\n")),
         place=("data.ins.curate.near_dup_threshold", "recipe.yaml:{line:.nan}")),
    Case("mix_weight_inf", "recipe",
         recipe=mini(("stages:\n", "  mixed:\n    mix: [{data: ins, weight: .inf}]\n    size: 10\nstages:\n")),
         place=("data.mixed.mix[0].weight", "recipe.yaml:{line:.inf}")),
    Case("seed_negative", "recipe", recipe=mini(("seeds: [0]\n", "seeds: [-1]\n")),
         place=("seeds", "recipe.yaml:2")),
    Case("seed_2_pow_64", "recipe", recipe=mini(("seeds: [0]\n", "seeds: [18446744073709551616]\n")),
         place=("seeds", "recipe.yaml:2")),
    Case("seed_huge_plan", "recipe", cmd=PLAN, recipe=mini(("seeds: [0]\n", "seeds: [" + "9" * 40 + "]\n")),
         place=("seeds",)),
    Case("stage_seed_negative", "recipe", recipe=sft("max_steps: 2", "max_steps: 2\n    seed: -5"),
         place=("stages.sft.seed", "recipe.yaml:{line:seed: -5}")),
    Case("max_steps_zero", "recipe", recipe=sft("max_steps: 2", "max_steps: 0"),
         place=("stages.sft.max_steps", "recipe.yaml:{line:max_steps: 0}")),
    Case("batch_size_negative", "recipe", recipe=sft("batch_size: 8", "batch_size: -8"),
         place=("stages.sft.batch_size", "recipe.yaml:{line:-8}")),
    Case("recipe_name_traversal", "recipe", recipe=mini(("name: mini\n", "name: ../../victim\n")),
         place=("name", "recipe.yaml:1")),
    Case("unknown_method", "recipe", recipe=mini(("    method: sft\n", "    method: spo\n")),
         place=("stages.sft", "spo", FILE_LINE)),
    Case("unknown_stage_in_pipeline", "recipe", recipe=mini(("  sft: [sft]\n", "  sft: [sfft]\n")),
         place=("pipelines.sft[0]", "recipe.yaml:{line:sfft}")),
]

# Overrides (-o KEY=VALUE): each problem names the override or the key it sets.
OVERRIDES = [
    Case("override_no_equals", "recipe", cmd=(*VALIDATE, "-o", "stages.sft.learning_rate"),
         place=("stages.sft.learning_rate",)),
    Case("override_empty_key", "recipe", cmd=(*VALIDATE, "-o", "=1"), place=("-o",)),
    Case("override_empty_part", "recipe", cmd=(*VALIDATE, "-o", "stages..learning_rate=1"),
         place=("stages..learning_rate",)),
    Case("override_unknown_key", "recipe", cmd=(*VALIDATE, "-o", "nosuch.key=1"), place=("nosuch",)),
    Case("override_lr_inf", "recipe", cmd=(*VALIDATE, "-o", "stages.sft.learning_rate=.inf"),
         place=("stages.sft.learning_rate",)),
    Case("override_lr_text", "recipe", cmd=(*VALIDATE, "-o", "stages.sft.learning_rate=abc"),
         place=("stages.sft.learning_rate",)),
    Case("override_python_tag", "recipe",
         cmd=(*VALIDATE, "-o", "stages.sft.learning_rate=!!python/object/apply:os.system [touch pwned]"),
         place=("stages.sft.learning_rate",)),
    Case("override_bad_yaml", "recipe", cmd=(*VALIDATE, "-o", "seeds=[0"), place=("seeds",)),
    Case("override_seed_negative", "recipe", cmd=(*VALIDATE, "-o", "seeds=[-1]"), place=("seeds",)),
    Case("override_stage_scalar", "recipe", cmd=(*VALIDATE, "-o", "stages.sft=5"), place=("stages.sft",)),
    Case("override_name_traversal", "recipe", cmd=(*VALIDATE, "-o", "name=../../victim"), place=("name",)),
    Case("override_pipeline_slash", "recipe", cmd=(*VALIDATE, "-o", "pipelines.a/b=[sft]"),
         place=("pipelines",)),
    Case("override_builtin_model_typo", "recipe", cmd=(*VALIDATE, "-o", "model.name=builtin:mikro-llama"),
         place=("model.name",)),
]

# ---------------------------------------------------------------- names that become paths

NAMES = {
    "dotdot3": "../../../victim",
    "absolute": "{tmp}/victim",
    "slash": "a/b",
    "dotdot": "..",
    "nul": "a\0b",
    "division_slash": "a\u2215b",
    "rtl_override": "\u202eabc",
    "newline": "a\nb",
    "empty": "",
    "long300": "x" * 300,
}


def named(kind: str, name: str, curate: bool = False) -> str:
    """MINI with the pipeline, stage, dataset or external model named `name`."""
    q = json.dumps(name)   # a JSON string is a valid YAML double-quoted scalar
    if kind == "pipelines":
        return mini(("  sft: [sft]\n", f"  {q}: [sft]\n"))
    if kind == "stages":
        return mini(("  sft:\n    method: sft\n", f"  {q}:\n    method: sft\n"), ("[sft]", f"[{q}]"))
    if kind == "data":
        extra = "    curate: {dedup: exact}\n" if curate else ""
        return mini(("  ins:\n", f"  {q}:\n"), ("    limit: 32\n", f"    limit: 32\n{extra}"),
                    ("    data: ins\n", f"    data: {q}\n"))
    assert kind == "external"
    return MINI + f"external:\n  {q}: builtin:micro-llama\n"


def name_cases() -> list[Case]:
    cases = []
    for kind in ("pipelines", "stages", "data", "external"):
        for label, name in NAMES.items():
            cases.append(Case(f"name_{kind}_{label}", "recipe", recipe=named(kind, name),
                              place=(kind, FILE_LINE)))
    # The same names through the commands that write: nothing may land outside.
    for kind, cmd, seeded in (("pipelines", RUN, True), ("stages", RUN, True), ("external", RUN, True),
                              ("data", PLAN, False)):
        for label in ("dotdot3", "absolute"):
            cases.append(Case(f"name_{kind}_{label}_{cmd[0]}", "recipe", cmd=cmd, seeded=seeded,
                              recipe=named(kind, NAMES[label], curate=True), place=(kind,)))
    return cases


# ---------------------------------------------------------------- data

def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


GOOD_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
DEEP_ROW = '{"messages": ' + "[" * 100000 + "]" * 100000 + "}"
TRAIN = "data/train.jsonl"

DATA = [
    Case("data_file_missing_validate", "data", recipe=from_file(TRAIN), place=("data.ins", "train.jsonl")),
    Case("data_file_missing_plan", "data", cmd=PLAN, recipe=from_file(TRAIN), place=("train.jsonl",)),
    Case("data_file_empty", "data", cmd=PLAN, recipe=from_file(TRAIN), files={TRAIN: ""},
         place=("train.jsonl",)),
    Case("data_only_blank_lines", "data", cmd=PLAN, recipe=from_file(TRAIN), files={TRAIN: "\n\n  \n"},
         place=("train.jsonl",)),
    Case("data_bad_json_line", "data", cmd=PLAN, recipe=from_file(TRAIN),
         files={TRAIN: jsonl(GOOD_ROW, GOOD_ROW, '{"messages": [', GOOD_ROW)}, place=("train.jsonl:3",)),
    Case("data_row_is_list", "data", cmd=PLAN, recipe=from_file(TRAIN),
         files={TRAIN: jsonl(GOOD_ROW, [1, 2])}, place=("train.jsonl:2",)),
    Case("data_line_not_utf8", "data", cmd=PLAN, recipe=from_file(TRAIN),
         files={TRAIN: jsonl(GOOD_ROW).encode() + b'{"messages": "\xff\xfe"}\n'}, place=("train.jsonl:2",)),
    Case("data_row_nested_100000", "data", cmd=PLAN, recipe=from_file(TRAIN),
         files={TRAIN: jsonl(GOOD_ROW, DEEP_ROW)}, place=("train.jsonl:2",)),
    Case("data_huge_field", "data", cmd=PLAN, recipe=from_file(TRAIN), exit=(0, 2), max_s=30.0,
         files={TRAIN: jsonl(GOOD_ROW, {"messages": [{"role": "user", "content": "x" * 1_000_000},
                                                     {"role": "assistant", "content": "y"}]})},
         place=("re:train.jsonl:2|stages \\(|status",)),
    Case("data_format_mismatch", "data", cmd=PLAN, recipe=from_file(TRAIN, "    format: alpaca\n"),
         files={TRAIN: jsonl(GOOD_ROW, GOOD_ROW)}, place=("train.jsonl:1",)),
    Case("data_wrong_columns", "data", cmd=PLAN, recipe=from_file(TRAIN),
         files={TRAIN: jsonl({"question": "q", "answer": "a"}, {"question": "q2", "answer": "a2"})},
         place=("train.jsonl",)),
    Case("data_unknown_role", "data", cmd=PLAN, recipe=from_file(TRAIN),
         files={TRAIN: jsonl({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]})},
         place=("train.jsonl:1",)),
    Case("data_json_object_not_array", "data", cmd=PLAN, recipe=from_file("data/train.json"),
         files={"data/train.json": '{"rows": 3}'}, place=("train.json",)),
    Case("data_json_truncated", "data", cmd=PLAN, recipe=from_file("data/train.json"),
         files={"data/train.json": json.dumps([GOOD_ROW, GOOD_ROW])[:-30]}, place=("train.json",)),
    Case("data_json_number", "data", cmd=PLAN, recipe=from_file("data/train.json"),
         files={"data/train.json": "42"}, place=("train.json",)),
    Case("data_csv_missing_columns", "data", cmd=PLAN, recipe=from_file("data/train.csv"),
         files={"data/train.csv": "foo,bar\n1,2\n"}, place=("train.csv",)),
    # Python's csv reads NUL since 3.11: accepting the row is fine, a traceback is not.
    Case("data_csv_nul_bytes", "data", cmd=PLAN, recipe=from_file("data/train.csv"), exit=(0, 2),
         files={"data/train.csv": b"instruction,output\nhi\x00there,ok\n"}, place=(r"re:train\.csv|status",)),
    Case("data_parquet_garbage", "data", cmd=PLAN, recipe=from_file("data/train.parquet"),
         files={"data/train.parquet": b"PAR1 this is not parquet"}, place=("train.parquet",)),
    Case("data_unsupported_suffix", "data", cmd=PLAN, recipe=from_file("data/train.txt"),
         files={"data/train.txt": "hello\n"}, place=("train.txt",)),
    Case("data_source_is_directory", "data", cmd=PLAN, recipe=from_file("rows_dir"),
         files={"rows_dir/notes.txt": "not data"}, place=("rows_dir", "a folder without data files")),
    Case("data_source_nul", "data", recipe=from_file('"data/tr\\0ain.jsonl"'), place=("data.ins.source",)),
    Case("data_source_nul_plan", "data", cmd=PLAN, recipe=from_file('"data/tr\\0ain.jsonl"'),
         place=("data.ins",)),
    Case("data_source_empty", "data", cmd=PLAN, recipe=from_file('""'), place=("data.ins",)),
    Case("builtin_dataset_unknown", "data", recipe=mini(("builtin:skills\n", "builtin:skils\n")),
         place=("data.ins.source", "recipe.yaml:{line:skils}")),
    Case("builtin_dataset_bad_split", "data", recipe=mini(("    limit: 32\n", "    limit: 32\n    split: tset\n")),
         place=("data.ins.split", "recipe.yaml:{line:tset}")),
    Case("builtin_dataset_bad_split_plan", "data", cmd=PLAN,
         recipe=mini(("    limit: 32\n", "    limit: 32\n    split: tset\n")), place=("data.ins.split",)),
    Case("builtin_dataset_format_preference", "data", cmd=PLAN,
         recipe=mini(("    limit: 32\n", "    limit: 32\n    format: preference\n")), place=("data.ins.format",)),
    Case("builtin_dataset_format_alpaca", "data", cmd=PLAN,
         recipe=with_dpo().replace("builtin:skills-preferences\n    limit: 32\n",
                                   "builtin:skills-preferences\n    limit: 32\n    format: alpaca\n"),
         place=(r"re:data\.prefs|stages\.dpo\.data",)),
    Case("eval_preferences_bad_split", "data",
         recipe=mini(("  samples: 0\n", "  samples: 0\n  preferences: {source: builtin:skills-preferences, "
                                        "split: tets}\n")),
         place=("eval.preferences.split",)),
    Case("hub_dataset_offline", "data", cmd=PLAN, recipe=from_file("nobody-xyz/no-such-dataset"),
         place=("nobody-xyz/no-such-dataset",)),
    Case("data_all_rows_skipped", "data", cmd=PLAN, recipe=from_file(TRAIN, "    on_bad_rows: skip\n"),
         files={TRAIN: jsonl([1], [2], '{"x": ')}, place=(r"re:data\.ins|train\.jsonl",)),
    Case("data_curation_drops_everything", "data", cmd=PLAN,
         recipe=mini(("    limit: 32\n", "    limit: 32\n    curate: {min_reply_tokens: 1000}\n")),
         place=("data.ins",)),
    Case("data_mix_weights_without_size", "data", cmd=PLAN,
         recipe=mini(("stages:\n", "  mixed:\n    mix: [{data: ins, weight: 1.0}]\nstages:\n"),
                     ("    data: ins\n", "    data: mixed\n")), place=("data.mixed",)),
    Case("dpo_on_instruction_data", "data", cmd=PLAN,
         recipe=with_dpo().replace("    data: prefs\n    learning_rate: 1.0e-3",
                                   "    data: ins\n    learning_rate: 1.0e-3"),
         place=("stages.dpo",)),
]

# ---------------------------------------------------------------- model

LORA_BAD = "model:\n  name: builtin:micro-llama\n  lora: {r: 4, alpha: 8, target_modules: [q_projj]}\n"

MODEL = [
    Case("model_local_dir_missing", "model", cmd=PLAN, recipe=mini(("builtin:micro-llama\n", "./models/nothere\n")),
         place=("models/nothere",)),
    Case("model_local_dir_empty", "model", cmd=PLAN, recipe=mini(("builtin:micro-llama\n", "./models/empty\n")),
         files={"models/empty/.keep": ""}, place=("models/empty",)),
    Case("model_local_bad_config", "model", cmd=PLAN, recipe=mini(("builtin:micro-llama\n", "./models/bad\n")),
         files={"models/bad/config.json": "{not json"}, place=("models/bad",)),
    # valid JSON that transformers' typed config refuses (found by QA: a traceback from plan)
    Case("model_local_config_wrong_types", "model", cmd=PLAN, recipe=mini(("builtin:micro-llama\n", "./models/typed\n")),
         files={"models/typed/config.json": '{"model_type": "llama", "hidden_size": "big"}'},
         place=("models/typed",)),
    Case("model_builtin_unknown", "model", recipe=mini(("builtin:micro-llama\n", "builtin:mikro-llama\n")),
         place=("model.name", "recipe.yaml:4")),
    Case("model_builtin_unknown_plan", "model", cmd=PLAN,
         recipe=mini(("builtin:micro-llama\n", "builtin:mikro-llama\n")), place=("mikro-llama",)),
    Case("model_hub_offline", "model", cmd=PLAN,
         recipe=mini(("builtin:micro-llama\n", "nobody-xyz/no-such-model\n")), place=("nobody-xyz/no-such-model",)),
    Case("model_name_empty", "model", recipe=mini(("builtin:micro-llama\n", '""\n')),
         place=("model.name", "recipe.yaml:4")),
    Case("model_name_nul", "model", cmd=PLAN, recipe=mini(("builtin:micro-llama\n", '"./mod\\0el"\n')),
         place=("model.name",)),
    Case("lora_bad_target", "model", cmd=PLAN,
         recipe=mini(("model:\n  name: builtin:micro-llama\n", LORA_BAD)), place=("target_modules", "q_projj")),
    Case("lora_bad_target_stage", "model", cmd=PLAN,
         recipe=sft("max_steps: 2", "max_steps: 2\n    lora: {r: 4, alpha: 8, target_modules: [nope_proj]}"),
         place=("stages.sft.lora", "nope_proj")),
    Case("lora_rank_zero", "model",
         recipe=mini(("model:\n  name: builtin:micro-llama\n", LORA_BAD.replace("r: 4", "r: 0"))),
         place=("model.lora.r", "recipe.yaml:{line:r: 0}")),
    Case("chat_template_unknown", "model",
         recipe=mini(("  name: builtin:micro-llama\n", "  name: builtin:micro-llama\n  chat_template: llama3\n")),
         place=("model.chat_template", "recipe.yaml:{line:llama3}")),
    Case("external_dir_missing", "model", cmd=PLAN, recipe=MINI + "external:\n  other: ./models/nothere\n",
         place=("external.other", "models/nothere")),
    Case("external_builtin_unknown", "model", recipe=MINI + "external:\n  other: builtin:nano-llama\n",
         place=("external.other", "recipe.yaml:{line:nano-llama}")),
    Case("curate_scorer_missing", "model", cmd=PLAN,
         recipe=mini(("    limit: 32\n", "    limit: 32\n    curate: {select: {strategy: ifd, n: 4, "
                                         "scorer: ./models/nothere}}\n")),
         place=("models/nothere",)),
]

# ---------------------------------------------------------------- eval

TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {repo}/evals/skills_test.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def task_file(name: str) -> str:
    return TASK.format(name=json.dumps(name), repo="{repo}")


def eval_cases() -> list[Case]:
    one = tasks("evals/bad.yaml")
    cases = [
        Case("task_file_missing", "eval", recipe=tasks("evals/nothere.yaml"),
             place=("eval.tasks[0]", "nothere.yaml")),
        Case("task_file_missing_plan", "eval", cmd=PLAN, recipe=tasks("evals/nothere.yaml"),
             place=("eval.tasks[0]", "nothere.yaml")),
        Case("task_yaml_invalid", "eval", recipe=one, files={"evals/bad.yaml": "task: [x\n"},
             place=("bad.yaml",)),
        Case("task_yaml_not_mapping", "eval", recipe=one, files={"evals/bad.yaml": "- task: x\n"},
             place=("bad.yaml",)),
        Case("task_yaml_no_task_key", "eval", recipe=one, files={"evals/bad.yaml": "dataset_path: json\n"},
             place=("bad.yaml",)),
        Case("task_yaml_not_utf8", "eval", recipe=one, files={"evals/bad.yaml": b"task: caf\xe9\n"},
             place=("bad.yaml",)),
        Case("task_yaml_data_missing", "eval", cmd=PLAN, recipe=one,
             files={"evals/bad.yaml": task_file("badtask").replace("{repo}/evals/skills_test.jsonl", "gone.jsonl")},
             place=("eval.tasks[0]", "gone.jsonl")),
        Case("task_yaml_include_missing", "eval", cmd=PLAN, recipe=one,
             files={"evals/bad.yaml": "include: base_gone.yaml\n" + task_file("badtask")},
             place=("bad.yaml", "base_gone.yaml")),
        Case("task_yaml_include_cycle", "eval", cmd=PLAN, recipe=one,
             files={"evals/bad.yaml": "include: bad.yaml\n" + task_file("badtask")}, place=("bad.yaml",)),
        Case("task_registry_misspelt", "eval", cmd=PLAN, recipe=tasks("arc_eazy"),
             place=("eval.tasks[0]", "arc_eazy")),
        # One recipe, two problems (each check builds lm-eval's task index, ~7-14 s): both named at once.
        Case("task_registry_needs_hub_and_missing_extra", "eval", cmd=PLAN, recipe=tasks("hellaswag, ifeval"),
             place=("hellaswag", "re:(?i)hub|offline", "ifeval", "langdetect")),
        Case("task_registry_misspelt_run_trains_nothing", "eval", cmd=RUN, recipe=tasks("arc_eazy"),
             place=("arc_eazy",), check=lambda env, out: _nothing_trained(env)),
        Case("task_entry_empty", "eval", recipe=tasks('""'), place=("eval.tasks[0]",)),
    ]
    bad_names = {"dotdot4": "../../../../victim", "absolute": "{tmp}/victim", "slash": "a/b", "nul": "a\0b",
                 "dot": "."}
    for label, name in bad_names.items():
        cases.append(Case(f"task_name_{label}", "eval", recipe=one, files={"evals/bad.yaml": task_file(name)},
                          place=("bad.yaml", "task")))
    for label in ("dotdot4", "absolute"):
        cases.append(Case(f"task_name_{label}_plan", "eval", cmd=PLAN, recipe=one,
                          files={"evals/bad.yaml": task_file(bad_names[label])}, place=("bad.yaml", "task")))
    return cases


def _nothing_trained(env) -> None:
    stages = env.cache / "stages"
    trained = sorted(p.name for p in stages.iterdir()) if stages.is_dir() else []
    assert not trained, f"stages trained before the eval task was checked: {trained}"


# ---------------------------------------------------------------- run directory

def _old_run_dir(env) -> None:
    """A run directory from before the marker existed: recognised by recipe.resolved.yaml."""
    for marker in env.out.iterdir():
        if marker.is_file() and marker.name not in ("recipe.resolved.yaml", "results.jsonl", "report.md"):
            marker.unlink()


def _no_broken_files(env, output) -> None:
    """After a failed write: no 0-byte files, no temporaries left in the run directory."""
    bad = [str(p.relative_to(env.out)) for p in env.out.rglob("*")
           if p.is_file() and not p.is_symlink() and (p.stat().st_size == 0 or ".tmp" in p.name)]
    assert not bad, f"left in the run directory after the failure: {bad}"


def _report_kept(env, output) -> None:
    _no_broken_files(env, output)
    assert (env.out / "report.md").read_bytes() == env.saved["report.md"], "report.md changed by a failed report"


def _cache_consistent(env, output) -> None:
    """Every published stage has a readable stage.json; no half-published entry."""
    for entry in (env.cache / "stages").iterdir():
        if entry.name.startswith("."):
            continue
        info = entry / "stage.json"
        assert info.is_file() and json.loads(info.read_text()), f"published without stage.json: {entry}"
        assert (entry / "model").is_dir(), f"published without a model: {entry}"


RUN_MINI_LR = sft("learning_rate: 1.0e-2", "learning_rate: 2.0e-2")   # a stage the seeded cache lacks

RUNDIR = [
    Case("out_is_a_file", "rundir", cmd=RUN, files={"run": "not a dir"}, place=("{out}",), frozen=("out",)),
    Case("out_nonempty_not_a_run_dir", "rundir", cmd=RUN, seeded=True,
         files={"run/thesis.tex": "my thesis", "run/data/x.csv": "1,2"}, place=("{out}",), frozen=("out",)),
    Case("out_is_cwd_with_recipe", "rundir", cmd=("run", "{recipe}", "--out", "."), seeded=True,
         files={"notes.txt": "mine"}, place=(r"re:{work}|--out|(^|\s)\.:",), frozen=("out",)),
    Case("out_is_cache_dir", "rundir", cmd=("run", "{recipe}", "--out", "{cache}/stages"), seeded=True,
         place=("{cache}/stages",), frozen=("cache",)),
    Case("out_run_dir_of_other_recipe", "rundir", cmd=RUN, recipe=mini(("name: mini\n", "name: other-experiment\n")),
         seeded=True, run_dir=True, place=("{out}", r"re:--force|\bmini\b"), frozen=("out",)),
    Case("out_pre_marker_run_dir_of_other_recipe", "rundir", cmd=RUN, seeded=True, run_dir=True,
         setup=lambda env: _old_run_dir(env), recipe=mini(("name: mini\n", "name: other-experiment\n")),
         place=("{out}", r"re:--force|\bmini\b"), frozen=("out",)),
    Case("out_run_dir_of_other_recipe_force", "control", cmd=(*RUN, "--force"), seeded=True, run_dir=True, exit=0,
         recipe=mini(("name: mini\n", "name: other-experiment\n")), place=("sft",)),
    Case("default_out_is_a_file", "rundir", cmd=("run", "{recipe}"), seeded=True, files={"runs/mini": "x"},
         place=("runs/mini",)),
    Case("out_read_only", "rundir", cmd=RUN, seeded=True, setup=lambda env: env.out.mkdir(), fault=("erofs", "out", ""),
         exit=1, place=("{out}",)),
    Case("cache_read_only_needs_training", "rundir", cmd=RUN, recipe=RUN_MINI_LR, seeded=True,
         fault=("erofs", "cache", ""), exit=1, place=("{cache}",)),
    Case("disk_full_writing_report", "rundir", cmd=RUN, seeded=True, fault=("enospc", "out", "report"),
         exit=1, place=("re:report|plots",), check=_no_broken_files),
    Case("disk_full_writing_plots", "rundir", cmd=RUN, seeded=True, fault=("enospc", "out", "plots"),
         exit=1, place=("plots",), check=_no_broken_files),
    Case("disk_full_publishing_stage", "rundir", cmd=RUN, recipe=RUN_MINI_LR, seeded=True,
         fault=("enospc", "cache", "stage.json"), exit=1, place=("{cache}",), check=_cache_consistent),
    Case("report_disk_full", "rundir", cmd=("report", "{out}"), run_dir=True, fault=("enospc", "out", "report"),
         exit=1, place=("re:report",), check=_report_kept),
    Case("report_results_truncated", "rundir", cmd=("report", "{out}"), run_dir=True,
         setup=lambda env: _truncate(env.out / "results.jsonl"), place=("results.jsonl",)),
    Case("report_results_garbled", "rundir", cmd=("report", "{out}"), run_dir=True,
         setup=lambda env: (env.out / "results.jsonl").write_bytes(b"\x00\xff garbage \x89PNG\n"),
         place=("results.jsonl",)),
    Case("report_results_row_missing_keys", "rundir", cmd=("report", "{out}"), run_dir=True,
         setup=lambda env: (env.out / "results.jsonl").write_text('{"x": 1}\n'), place=("results.jsonl",)),
    Case("report_results_row_not_object", "rundir", cmd=("report", "{out}"), run_dir=True,
         setup=lambda env: (env.out / "results.jsonl").write_text("[1, 2]\n"), place=("results.jsonl",)),
    Case("report_results_empty", "rundir", cmd=("report", "{out}"), run_dir=True,
         setup=lambda env: (env.out / "results.jsonl").write_text(""), place=("results.jsonl",)),
    Case("report_results_missing", "rundir", cmd=("report", "{out}"), run_dir=True,
         setup=lambda env: (env.out / "results.jsonl").unlink(), place=("results.jsonl",)),
    Case("report_recipe_broken", "rundir", cmd=("report", "{out}"), run_dir=True,
         setup=lambda env: (env.out / "recipe.resolved.yaml").write_text("name: [x\n"),
         place=("recipe.resolved.yaml",)),
    Case("report_pipelines_json_broken", "rundir", cmd=("report", "{out}"), run_dir=True,
         setup=lambda env: (env.out / "pipelines.json").write_text("{"), place=("pipelines.json",)),
    Case("report_merge_out_is_file", "rundir", cmd=("report", "{out}", "{out}", "--out", "{work}/merged"),
         run_dir=True, files={"merged": "x"}, place=("merged",)),
]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# Controls: the refusals above must not refuse what works today (not bad inputs).
CONTROLS = [
    Case("control_rerun_same_recipe", "control", cmd=RUN, seeded=True, run_dir=True, exit=0,
         place=("sft",)),
    Case("control_rerun_with_override", "control", cmd=(*RUN, "-o", "eval.limit=3"), seeded=True, run_dir=True,
         exit=0, place=("sft",)),
    Case("control_rerun_pre_marker_run_dir", "control", cmd=RUN, seeded=True, run_dir=True, setup=_old_run_dir,
         exit=0, place=("sft",)),
]

# ---------------------------------------------------------------- cache


def _stage(env) -> Path:
    return env.cache / "stages" / env.key


def _truncate_model(env) -> None:
    _truncate(_stage(env) / "model" / "model.safetensors")


def _corrupt_stage_json(text: str):
    def setup(env):
        (_stage(env) / "stage.json").write_text(text)
    return setup


def _not_reused(env, output) -> None:
    """A corrupt entry is reported and retrained or refused, never used."""
    assert "reuse  sft" not in output, "the corrupt cache entry was reused"
    if env.exit_code == 0:
        model = _stage(env) / "model" / "model.safetensors"
        assert model.stat().st_size == env.seed_model_size, "run succeeded but the corrupt weights are still there"


def _plan_not_reuse(env, output) -> None:
    rows = [line for line in output.splitlines() if line.startswith(("reuse ", "train ", "resume"))]
    assert rows and not any(line.startswith("reuse ") for line in rows), "plan would reuse a corrupt entry"


def _plant_outside_link(env) -> None:
    """A cache entry that is a symlink to a directory outside the cache."""
    (env.cache / "stages").mkdir(parents=True, exist_ok=True)
    (env.cache / "stages" / ("f" * 64)).symlink_to(env.tmp / "victim", target_is_directory=True)


def _victim_kept(env, output) -> None:
    assert (env.tmp / "victim" / "keep.txt").is_file()


def _dataset_corrupt(env) -> None:
    for arrow in (env.cache / "datasets").rglob("data-*.arrow"):
        _truncate(arrow)


def _eval_json_broken(env) -> None:
    for path in (env.cache / "evals").glob("*/eval.json"):
        path.write_text('{"rows": [')


CACHE = [
    Case("cache_model_truncated_run", "cache", cmd=RUN, seeded=True, setup=_truncate_model, exit=(0, 1, 2),
         place=("{key12}",), check=_not_reused),
    Case("cache_model_truncated_plan", "cache", cmd=PLAN, seeded=True, setup=_truncate_model, exit=(0, 2),
         place=("{key12}",), check=_plan_not_reuse),
    Case("cache_stage_json_invalid_run", "cache", cmd=RUN, seeded=True, setup=_corrupt_stage_json("{oops"),
         exit=(0, 1, 2), place=("{key12}",), check=_not_reused),
    Case("cache_stage_json_missing_keys_run", "cache", cmd=RUN, seeded=True, setup=_corrupt_stage_json("{}"),
         exit=(0, 1, 2), place=("{key12}",), check=_not_reused),
    Case("cache_stage_json_invalid_plan", "cache", cmd=PLAN, seeded=True, setup=_corrupt_stage_json("[1"),
         exit=(0, 2), place=("{key12}",), check=_plan_not_reuse),
    Case("cache_stage_json_invalid_ls", "cache", cmd=("cache", "ls"), seeded=True,
         setup=_corrupt_stage_json("{oops"), exit=0, place=("{key12}",)),
    Case("cache_model_dir_deleted_run", "cache", cmd=RUN, seeded=True,
         setup=lambda env: __import__("shutil").rmtree(_stage(env) / "model"), exit=(0, 1, 2),
         place=("{key12}",), check=lambda env, out: _assert_not_reused_simple(out)),
    Case("cache_eval_json_broken_run", "cache", cmd=RUN, seeded=True, setup=_eval_json_broken, exit=(0, 1, 2),
         place=(r"re:eval\.json|/evals/",), check=lambda env, out: _assert_eval_not_reused(out)),
    Case("cache_dataset_arrow_truncated_run", "cache", cmd=RUN, recipe=RUN_MINI_LR, seeded=True,
         setup=_dataset_corrupt, exit=(0, 1, 2), place=(r"re:datasets/|\.arrow",)),
    Case("gc_older_than_negative", "cache", cmd=("cache", "gc", "--older-than", "-1"), seeded=True,
         place=("--older-than",), frozen=("cache",)),
    Case("gc_older_than_nan", "cache", cmd=("cache", "gc", "--older-than", "nan"), seeded=True,
         place=("--older-than",), frozen=("cache",)),
    Case("gc_max_size_negative", "cache", cmd=("cache", "gc", "--max-size", "-5GB"), seeded=True,
         place=("--max-size",), frozen=("cache",)),
    Case("gc_max_size_nonsense", "cache", cmd=("cache", "gc", "--max-size", "5XB"), seeded=True,
         place=("--max-size",), frozen=("cache",)),
    Case("rm_traversal", "cache", cmd=("cache", "rm", "../../victim"), seeded=True,
         place=("../../victim",), frozen=("cache",)),
    Case("rm_absolute_path", "cache", cmd=("cache", "rm", "{tmp}/victim"), seeded=True,
         place=("{tmp}/victim",), frozen=("cache",)),
    Case("rm_symlinked_entry_keeps_target", "cache", cmd=("cache", "rm", "ffffffff"), setup=_plant_outside_link,
         exit=0, place=("removed 1",), check=_victim_kept),
    Case("gc_symlinked_entry_keeps_target", "cache", cmd=("cache", "gc", "--older-than", "0", "--max-size", "0"),
         setup=_plant_outside_link, exit=0, place=("freed",), check=_victim_kept),
    Case("cache_path_is_a_file", "cache", cmd=("cache", "ls", "--cache", "{work}/cachefile"),
         files={"cachefile": "x"}, place=("cachefile",)),
]


def _assert_eval_not_reused(output: str) -> None:
    assert "reuse  eval" not in output, "an evaluation with a broken eval.json was reused"


def _assert_not_reused_simple(output: str) -> None:
    assert "reuse  sft" not in output, "a cache entry without its model was reused"


def all_cases() -> list[Case]:
    cases = RECIPE + OVERRIDES + name_cases() + DATA + MODEL + eval_cases() + RUNDIR + CACHE + CONTROLS
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases
