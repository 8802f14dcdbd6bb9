"""Check before spending: everything that can fail a run is checked before the first stage trains.

Two phases, one entry point each; every problem is reported at once, each under
its recipe key, as a RecipeError (exit 2):

- ``check_static`` imports nothing heavy (no torch, transformers, lm_eval) and runs
  in `posttrain validate` and first in `plan` and `run`: builtin model names, local
  model folders, local data files (resolved as the data loader resolves them: from
  the recipe's folder), local eval task files (found, strictly parsed, their ``task:``
  a valid folder name, their includes, data files and ``!function`` modules present).
  (Builtin dataset names, splits and formats are checked by the recipe schema.)
- ``check_before_training`` needs the heavy libraries and runs at the start of `plan`
  and `run`, before any data is curated or any stage trains: the model (and each
  external model) exists, its tokenizer renders the chat template on a sample
  conversation, LoRA ``target_modules`` exist in the model (built on the meta
  device: no weights), and every eval task loads as lm-eval will load it (registry
  names exist, ``!function`` modules import, task data is reachable or cached).
- ``check_max_lengths`` runs once the data is loaded, still before any stage trains: a
  stage whose every row its ``max_length`` leaves nothing to train is refused; one that
  loses some rows has them counted in the log.

The model and lm-eval checks live with their owners (``models``, ``evaluate``);
this module decides what to check and names the recipe keys.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from posttrain.errors import DataError, RecipeError

Problem = tuple[tuple, str]   # (recipe key path, message)


# ---------------------------------------------------------------- static


def check_static(recipe, base_dir: Path, recipe_file: Path | str | None = None,
                 world_size: int | None = None) -> None:
    """Raise RecipeError listing every problem found without heavy imports.

    ``base_dir``: the recipe's folder (relative data paths resolve there);
    ``recipe_file``: the recipe, to name file and line in messages;
    ``world_size``: the processes each stage's global batch is shared by (None: this run's).
    """
    from posttrain.recipe.yamlfile import problems_error

    problems = static_problems(recipe, Path(base_dir), world_size)
    if problems:
        raise problems_error(Path(recipe_file).name if recipe_file else "recipe", problems,
                             _line_index(recipe_file))


def static_problems(recipe, base_dir: Path, world_size: int | None = None) -> list[Problem]:
    return (_model_name_problems(recipe) + _template_file_problems(recipe, base_dir)
            + _data_source_problems(recipe, base_dir) + _task_file_problems(recipe, base_dir)
            + batch_problems(recipe, world_size) + sharding_problems(recipe, base_dir, world_size)
            + cluster_problems(recipe))


def cluster_problems(recipe) -> list[Problem]:
    """The recipe's `resources:` against its stages (used by `run --executor slurm`)."""
    from posttrain.cluster import resource_problems

    return resource_problems(recipe)


def batch_problems(recipe, world_size: int | None = None) -> list[Problem]:
    """Each stage whose global batch (batch_size x gradient_accumulation) the world size
    (None: this run's, from the launcher) cannot share evenly, with the nearest valid settings."""
    from posttrain.distributed import batch_problem, world_size as launched_world_size

    world = launched_world_size() if world_size is None else world_size
    problems = []
    for name, spec in recipe.stages.items():
        message = batch_problem(spec.batch_size, spec.gradient_accumulation, world)
        if message:
            problems.append((("stages", name, "batch_size"), message))
    return problems


def sharding_problems(recipe, base_dir: Path, world_size: int | None = None,
                      device: str | None = None) -> list[Problem]:
    """The recipe's `distributed:` section and the combinations known to fail in TRL/peft
    today, each refused with its reason. Strategy-dependent refusals apply to several
    processes (one process is always `single`); `device` ("cpu"/"cuda", None: not known
    without torch, so `check_before_training` asks again) refuses strategies CPU cannot run."""
    from posttrain.distributed import world_size as launched_world_size

    world = launched_world_size() if world_size is None else world_size
    strategy, problems = _accelerate_config_problems(recipe, Path(base_dir), world)
    for name, stage in recipe.stages.items():
        problems += _stage_combination_problems(recipe, name, stage, strategy if world > 1 else "single")
    if world > 1:
        problems += _strategy_problems(recipe, strategy, device)
    return problems


def _accelerate_config_problems(recipe, base_dir: Path, world: int) -> tuple[str, list[Problem]]:
    """(the strategy the recipe trains with, as far as known without the machine, and the
    problems): the accelerate config file exists and names the recipe's strategy (auto
    follows it), and so does the launcher's (accelerate launch exports it)."""
    from posttrain.distributed import (config_strategy, launcher_precision_problem, launcher_problem,
                                       launcher_strategy, read_accelerate_config)

    spec, problems = recipe.distributed, []
    strategy = spec.strategy
    path = spec.config_file(base_dir)
    if path is not None:
        loc = ("distributed", "accelerate_config")
        try:
            config = read_accelerate_config(path)
        except ValueError as exc:
            return strategy, [(loc, f"{exc} (a relative path is taken from the recipe's folder)")]
        named = config_strategy(config)
        if launcher_precision_problem({"ACCELERATE_MIXED_PRECISION": str(config.get("mixed_precision", "no"))}):
            problems.append((loc, f"{path.name} sets mixed_precision {config['mixed_precision']}, which transformers "
                                  "applies to every stage not in bf16 itself (a float32 stage would train in "
                                  "autocast); set mixed_precision: 'no' (posttrain sets each stage's precision from "
                                  "model.dtype)"))
        if strategy == "auto":
            strategy = named
        elif named not in (strategy, "single") and not (named == "ddp" and strategy == "ddp"):
            problems.append((loc, f"{path.name} runs {named} but distributed.strategy is {strategy}; "
                                  "make them agree (strategy auto follows the file)"))
    precision = launcher_precision_problem()
    if precision:
        problems.append((("model", "dtype"), precision))
    if world > 1:
        launched = launcher_strategy()
        message = launcher_problem(spec.strategy, launched)
        if message:
            problems.append((("distributed", "strategy"), message))
        elif launched and strategy == "auto":
            strategy = launched
    return strategy, problems


# Why each strategy cannot run on CPU processes. Measured with torchrun --nproc_per_node 2
# (gloo; torch 2.13 CPU, transformers 5.24, accelerate 1.15, TRL 1.16), SFTTrainer on the
# micro model with fsdp=True, fsdp_config={"version": 2, ...}: with use_cpu=True accelerate
# sets up DistributedType.MULTI_CPU and drops the FSDP plugin (trainer.is_fsdp_enabled
# False, the model wrapped in DistributedDataParallel: it trains, silently as ddp); without
# use_cpu, transformers raises "ValueError: Using fsdp only works in distributed training.".
CPU_REFUSALS = {
    "fsdp2": "FSDP2 needs CUDA GPUs: on CPU accelerate drops the FSDP plugin and the processes train as ddp "
             "(use ddp on CPU)",
    "zero2": "DeepSpeed ZeRO needs CUDA GPUs (use ddp on CPU)",
    "zero3": "DeepSpeed ZeRO needs CUDA GPUs (use ddp on CPU)",
}


def _strategy_problems(recipe, strategy: str, device: str | None) -> list[Problem]:
    """A strategy the machine or the installed packages cannot run."""
    import importlib.util

    from posttrain.distributed import DEEPSPEED_INSTALL, DEEPSPEED_STRATEGIES

    loc = ("distributed", "strategy")
    problems = []
    if device == "cpu" and strategy in CPU_REFUSALS:
        problems.append((loc, f"{strategy}: {CPU_REFUSALS[strategy]}"))
    if strategy in DEEPSPEED_STRATEGIES and importlib.util.find_spec("deepspeed") is None:
        problems.append((loc, f"{strategy} needs DeepSpeed, which is not installed: {DEEPSPEED_INSTALL}"))
    if strategy in ("fsdp2", "zero3") and recipe.model.quantization is not None:
        problems.append((("model", "quantization"), f"QLoRA under {strategy} is not supported by posttrain: its "
                         "4-bit weights are stored as uint8, which cannot be sharded (use ddp or zero2)"))
    return problems


def _stage_combination_problems(recipe, name: str, stage, strategy: str) -> list[Problem]:
    """A stage's settings that fail together in TRL 1.16 / peft today."""
    import importlib.util

    from posttrain.recipe.schema import resolve_lora

    problems = []
    loc = ("stages", name)
    if stage.method == "dpo" and stage.trainer.get("padding_free"):
        problems.append((loc + ("trainer", "padding_free"), "a no-op in TRL 1.16's DPOTrainer (it warns and "
                         "pads anyway); remove it"))
    if stage.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        problems.append((loc + ("use_liger_kernel",), "needs Liger's kernels: pip install liger-kernel (a CUDA GPU)"))
    if stage.use_liger_kernel and stage.method == "dpo" and strategy == "fsdp2":
        problems.append((loc + ("use_liger_kernel",), "Liger's DPO loss fails under FSDP2 (TRL 1.16); turn it off "
                         "or use ddp/zero"))
    if strategy == "zero3" and resolve_lora(recipe, stage) is not None and stage.gradient_checkpointing:
        problems.append((loc + ("gradient_checkpointing",), "LoRA under zero3 with posttrain's non-reentrant "
                         "gradient checkpointing crashes (peft/DeepSpeed); turn it off or use fsdp2"))
    return problems


TEMPLATE_MAX_BYTES = 1 << 20


def _template_file_problems(recipe, base_dir: Path) -> list[Problem]:
    """A chat template file exists, is a regular file of text (under 1 MB)."""
    if recipe.model._base_dir is None:
        recipe.model._base_dir = Path(base_dir).resolve()   # a recipe validated from a mapping
    path = recipe.model.template_file()
    if path is None:
        return []
    loc = ("model", "chat_template")
    if not path.exists():
        return [(loc, f"template file not found: {path} (a relative path is taken from the recipe's folder)")]
    if not path.is_file():
        return [(loc, f"not a regular file: {path} (a chat template is a Jinja text file)")]
    if path.stat().st_size > TEMPLATE_MAX_BYTES:
        return [(loc, f"{path}: {path.stat().st_size:,} bytes; a chat template is under 1 MB")]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [(loc, f"cannot read {path} as UTF-8 text: {exc}")]
    from posttrain.models import is_jinja

    if not is_jinja(text):
        return [(loc, f"{path} holds no Jinja ({{{{ }}}} or {{% %}}): not a chat template")]
    return []


def _model_name_problems(recipe) -> list[Problem]:
    from posttrain.models import builtin_problem, is_builtin, local_model_problem

    named = [(("model", "name"), recipe.model.name)]
    named += [(("external", name), model) for name, model in recipe.external.items()]
    problems = []
    for loc, name in named:
        problem = builtin_problem(name) if is_builtin(name) else local_model_problem(name)
        if problem:
            problems.append((loc, problem))
    return problems


def _data_source_problems(recipe, base_dir: Path) -> list[Problem]:
    sources = [(("data", name, "source"), spec.source) for name, spec in recipe.data.items()]
    if recipe.eval.preferences is not None:
        sources.append((("eval", "preferences", "source"), recipe.eval.preferences.source))
    problems = []
    for loc, source in sources:
        problem = source_problem(source, base_dir) if source is not None else None  # None: a mix
        if problem:
            problems.append((loc, problem))
    return problems


def source_problem(source: str, base_dir: Path) -> str | None:
    """Why a local data file cannot be read, as far as that is known without reading it.

    (`builtin:` names, splits and formats are checked by the recipe schema.)
    """
    from posttrain.data.io import DATA_SUFFIXES, _locate

    if source.startswith("builtin:"):
        return None
    try:
        path, _hub_id = _locate(source, base_dir)   # the loader's own resolution
    except DataError as exc:
        return str(exc)
    if path is not None and path.is_dir():   # a hub dataset's repo layout: `datasets` finds the splits
        found = any(f.suffix.lower() in DATA_SUFFIXES + (".arrow",) for f in path.rglob("*")
                    if not any(part.startswith(".") for part in f.relative_to(path).parts))
        return None if found else (f"{path}: a folder without data files ({', '.join(DATA_SUFFIXES)}); a dataset "
                                   "folder is laid out as on the hub, e.g. data/train-00000-of-00001.parquet")
    if path is not None and path.suffix.lower() not in DATA_SUFFIXES:
        return (f"{path}: unsupported data file type {path.suffix or '(no extension)'!r} "
                f"(use {', '.join(DATA_SUFFIXES)})")
    return None


def _task_file_problems(recipe, base_dir: Path) -> list[Problem]:
    from posttrain.evaluate import check_task_entries, task_search_dirs

    _refs, problems = check_task_entries(recipe.eval.tasks, task_search_dirs(base_dir))
    return [(("eval", "tasks") if i is None else ("eval", "tasks", i), message) for i, message in problems]


# ---------------------------------------------------------------- before training


def check_before_training(recipe, refs: list, task_dir: Path | None,
                          log: Callable[[str], None] = lambda line: None, device: str | None = None,
                          world_size: int | None = None) -> None:
    """Raise RecipeError listing every problem that would stop the run after training started.

    ``refs``/``task_dir``: the resolved eval tasks and their prepared folder
    (``evaluation.prepare_eval``). Loads tokenizers and model configs, never weights.
    """
    started = time.perf_counter()
    problems = (quantization_problems(recipe) + trainer_setting_problems(recipe) + model_problems(recipe)
                + device_strategy_problems(recipe, device, world_size) + eval_task_problems(refs, task_dir, log))
    log(f"checks: model, tokenizer, chat template, LoRA targets and {len(refs)} eval task(s) "
        f"checked in {time.perf_counter() - started:.1f} s")
    if problems:
        raise RecipeError(f"{len(problems)} problem(s) found before training (nothing was trained)",
                          [_render(loc, message) for loc, message in problems])


def device_strategy_problems(recipe, device: str | None = None, world_size: int | None = None) -> list[Problem]:
    """The strategy on the device planned for (None: this machine's), which `validate`
    cannot know without torch: fsdp2 and ZeRO refused on CPU processes."""
    from posttrain.defaults import machine
    from posttrain.distributed import world_size as launched_world_size

    world = launched_world_size() if world_size is None else world_size
    if world == 1:
        return []
    strategy, _ = _accelerate_config_problems(recipe, recipe.model._base_dir or Path("."), world)
    found = _strategy_problems(recipe, strategy, machine(device).device)
    return [(loc, message) for loc, message in found if "CUDA GPUs" in message]


def trainer_setting_problems(recipe) -> list[Problem]:
    """Each stage's `trainer:` passthrough against its method's TRL config (a field of it,
    not one a recipe setting names or posttrain owns, and values the config accepts), and
    optimizers that need bitsandbytes."""
    import importlib.util

    from posttrain.recipe.fields import BNB_OPTIMIZERS
    from posttrain.stages import METHODS
    from posttrain.stages.common import passthrough_problems

    problems: list[Problem] = []
    if recipe.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        problems.append((("model", "attn_implementation"), "flash_attention_2 needs the flash-attn package "
                         "(a CUDA build: pip install flash-attn --no-build-isolation), or use sdpa"))
    if recipe.tracking.tensorboard and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        problems.append((("tracking", "tensorboard"), "needs TensorBoard's writer: pip install tensorboard"))
    for name, stage in recipe.stages.items():
        if stage.optim in BNB_OPTIMIZERS and importlib.util.find_spec("bitsandbytes") is None:
            problems.append((("stages", name, "optim"), f"{stage.optim} needs bitsandbytes: pip install "
                                                        "'posttrain[qlora]' (or use adamw_torch)"))
        if not stage.trainer:
            continue
        config_class = trl_config_class(METHODS[stage.method])
        fields = {f.name for f in dataclasses.fields(config_class)}
        found = passthrough_problems(stage, fields)
        problems += [(("stages", name, "trainer", key), f"{message} ({config_class.__name__})")
                     for key, message in found]
        if found:
            continue
        mistyped = _passthrough_type_problems(config_class, stage.trainer)
        problems += [(("stages", name, "trainer", key), f"{message} ({config_class.__name__})")
                     for key, message in mistyped]
        if not mistyped:
            problems += _config_accepts(config_class, stage.trainer, ("stages", name, "trainer"))
    return problems


def _passthrough_type_problems(config_class, settings: dict) -> list[tuple[str, str]]:
    """[(key, why)] for each `trainer:` value whose type the config field's annotation does not
    allow. TRL's configs are dataclasses that do not check types: a string where a float is
    wanted (`neftune_noise_alpha: "5"`, or YAML's `1e-5`, which is text) built the config and
    failed as a traceback in the middle of training."""
    import typing

    hints = typing.get_type_hints(config_class)
    problems = []
    for key, value in settings.items():
        if key in hints and not _value_fits(value, hints[key]):
            hint = hints[key]
            wanted = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            note = " (YAML reads 1e-5 as text: write 1.0e-5)" if isinstance(value, str) and _looks_numeric(value) else ""
            problems.append((key, f"expects {wanted}, got {type(value).__name__} {value!r}{note}"))
    return problems


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _value_fits(value, hint) -> bool:
    """Whether a YAML value may go to a dataclass field annotated `hint`; a type this does not
    know (an enum, a class) is left to the config's own checks."""
    import enum
    import types
    import typing

    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_value_fits(value, arm) for arm in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, str) and value in {member.value for member in hint}
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint is list or origin is list:
        return isinstance(value, list)
    return True


def _config_accepts(config_class, settings: dict, loc: tuple) -> list[Problem]:
    """Build the TRL config with the passthrough values alone: what it refuses (a type,
    a value its checks reject) is said here, not when the stage starts."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        try:
            config_class(output_dir=scratch, use_cpu=True, bf16=False, report_to=[], **settings)
        except Exception as exc:   # TRL's and transformers' own checks: the user's values
            return [(loc, f"{config_class.__name__} refuses these values: {type(exc).__name__}: {exc}")]
    return []


def trl_config_class(method):
    """The TRL config class of a method's trainer (`trl.DPOTrainer` -> `trl.DPOConfig`)."""
    import importlib
    import warnings

    module_name, class_name = method.trainer.split(" ")[0].rsplit(".", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # trl.experimental warns on import
        module = importlib.import_module(module_name)
    return getattr(module, class_name.replace("Trainer", "Config"))


def quantization_problems(recipe) -> list[Problem]:
    """QLoRA needs bitsandbytes (the `qlora` extra) and a CUDA GPU: refused here, not after
    the data is tokenized or as a traceback from bitsandbytes."""
    if recipe.model.quantization is None:
        return []
    import importlib.util

    import torch

    loc = ("model", "quantization")
    if not torch.cuda.is_available():
        return [(loc, "4-bit loading (QLoRA, bitsandbytes) needs a CUDA GPU and this machine has none; remove "
                      f"model.quantization to train LoRA on {recipe.model.dtype} weights here")]
    if importlib.util.find_spec("bitsandbytes") is None:
        return [(loc, "4-bit loading (QLoRA) needs bitsandbytes: pip install 'posttrain[qlora]'")]
    return []


def model_problems(recipe) -> list[Problem]:
    """The base model and each external model: exists, tokenizer and chat template; LoRA targets."""
    from posttrain.models import ModelSource

    base = ModelSource.of(recipe.model)
    problems = _source_problems(base, ("model",))
    if not problems or problems[0][0] != ("model", "name"):
        problems += lora_problems(recipe, base)
    for name, model in recipe.external.items():
        problems += _source_problems(ModelSource.of(recipe.model, name=model), ("external", name))
    return problems


def _source_problems(source, loc: tuple) -> list[Problem]:
    """The model exists (its config loads; builtin names were checked statically) and its
    tokenizer renders the chat template."""
    from posttrain.errors import ModelError
    from posttrain.models import chat_template_problem, is_builtin, load_tokenizer, model_config

    name_loc = loc + ("name",) if loc == ("model",) else loc
    try:
        if not is_builtin(source.name):
            model_config(source)   # first: says clearly when a hub model is not cached offline
        tokenizer = load_tokenizer(source)
    except ModelError as exc:
        return [(name_loc, str(exc))]
    problem = chat_template_problem(tokenizer, source.chat_template)
    return [(("model", "chat_template") if loc == ("model",) else loc, problem)] if problem else []


def lora_problems(recipe, source) -> list[Problem]:
    """Each LoRA spec's target_modules (the model's, each stage's own) against the model's modules."""
    from posttrain.models import lora_target_problems, meta_model, model_config

    specs = [(("model", "lora"), recipe.model.lora)]
    specs += [(("stages", name, "lora"), stage.lora) for name, stage in recipe.stages.items()]
    specs = [(loc, lora) for loc, lora in specs if lora and lora.target_modules != "all-linear"]
    if not specs:
        return []
    model = meta_model(model_config(source), trust_remote_code=source.trust_remote_code)
    return [(loc + ("target_modules",) + ((i,) if i is not None else ()), message)
            for loc, lora in specs for i, message in lora_target_problems(model, lora.target_modules)]


def eval_task_problems(refs: list, task_dir: Path | None, log: Callable[[str], None]) -> list[Problem]:
    from posttrain.evaluate import task_problems

    return [(("eval", "tasks", i), message) for i, message in task_problems(refs, task_dir, log)]


# ---------------------------------------------------------------- once the data is loaded


def check_max_lengths(recipe, data: dict, log: Callable[[str], None] = lambda line: None,
                      tokenizer=None) -> dict[str, int]:
    """Raise RecipeError naming ``stages.<name>.max_length`` for every stage whose rows
    max_length would all drop (nothing to train: the stage would fail once its upstream
    stages had trained); log how many rows each other stage drops, and return that count
    per stage name (estimated from a sample beyond estimate.SAMPLE_ROWS rows).

    ``data``: the loaded stage data (``plan.load_stage_data``), keyed
    ``<dataset>:<instruction|preference>``. Runs in `plan` and `run` before any stage trains.
    """
    problems, notes, dropped = max_length_problems(recipe, data, tokenizer)
    for note in notes:
        log(note)
    if problems:
        raise RecipeError(f"{len(problems)} problem(s) found before training (nothing was trained)",
                          [_render(loc, message) for loc, message in problems])
    return dropped


def max_length_problems(recipe, data: dict, tokenizer=None) -> tuple[list[Problem], list[str], dict[str, int]]:
    """(problems of stages whose every row is dropped, a note per stage that drops some,
    the rows each stage drops).

    Each used stage's rows are measured with estimate.first_trained_position (all rows
    up to estimate.SAMPLE_ROWS, a seeded sample beyond), once per dataset and method.
    """
    from posttrain.estimate import first_trained_position, measured_rows, prompt_fill
    from posttrain.models import template_has_generation_markers

    from posttrain.models import ModelSource, chat_tokenizer
    from posttrain.stages import METHODS

    tokenizer = tokenizer or chat_tokenizer(ModelSource.of(recipe.model))
    assistant_masks = template_has_generation_markers(tokenizer)   # as stages/sft.py decides
    used = {name for chain in recipe.pipelines.values() for name in chain}
    positions: dict[tuple[str, str], list[int]] = {}
    problems: list[Problem] = []
    notes: list[str] = []
    dropped: dict[str, int] = {}
    for name, spec in recipe.stages.items():
        if name not in used:
            continue
        method = METHODS[spec.method]
        kind = method.data
        examples = data[f"{spec.data}:{kind}"].examples
        add_bos = method.prompt_bos and getattr(tokenizer, "bos_token_id", None) is not None
        key = (f"{spec.data}:{kind}", add_bos)   # methods on one kind share a count unless one adds a BOS
        if key not in positions:
            positions[key] = [first_trained_position(examples[i], tokenizer, assistant_masks=assistant_masks,
                                                     add_bos=add_bos)
                              for i in measured_rows(len(examples))]
        fill = prompt_fill(positions[key], len(examples), spec.max_length)
        dropped[name] = fill.dropped_rows
        if fill.all_dropped:
            problems.append((("stages", name, "max_length"), _all_dropped_message(spec, kind, fill)))
        elif fill.dropped:
            notes.append(_dropped_note(name, spec, kind, fill))
    return problems, notes, dropped


def _unit(kind: str) -> str:
    return {"instruction": "conversation", "preference": "pair", "unpaired": "completion"}[kind]


def _what_fills(kind: str) -> str:
    return ("the prompt before the first reply fills max_length" if kind == "instruction"
            else "the prompt alone fills max_length")


def _all_dropped_message(spec, kind: str, fill) -> str:
    counted = (f"every one of the {fill.rows:,} {_unit(kind)}s" if fill.measured == fill.rows
               else f"every one of the {fill.measured:,} {_unit(kind)}s sampled (of {fill.rows:,})")
    return (f"{counted} of data {spec.data!r} would be dropped before training: {_what_fills(kind)} "
            f"({spec.max_length} tokens; the shortest such prompt takes {fill.shortest}), leaving nothing to "
            f"train on. Raise max_length above {fill.shortest} (a reply needs tokens of its own too)")


def _dropped_note(name: str, spec, kind: str, fill) -> str:
    share = f"{100 * fill.dropped / fill.measured:.1f}%"
    counted = (f"{fill.dropped:,} of {fill.rows:,} {_unit(kind)}s ({share})" if fill.measured == fill.rows
               else f"about {fill.dropped_rows:,} of {fill.rows:,} {_unit(kind)}s ({share} of "
                    f"{fill.measured:,} sampled)")
    return (f"stages.{name}: {counted} will be dropped before training: {_what_fills(kind)} "
            f"({spec.max_length} tokens)")


# ---------------------------------------------------------------- messages


def _render(loc: tuple, message: str) -> str:
    from posttrain.recipe.yamlfile import dotted

    return f"{dotted(loc)}: {message}"


def _line_index(recipe_file: Path | str | None) -> dict:
    from posttrain.recipe.yamlfile import line_index

    if recipe_file is None:
        return {}
    try:
        return line_index(Path(recipe_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return {}
