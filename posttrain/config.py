"""The recipe schema (pydantic v2, strict) and its loading, overrides and errors.

A recipe is the experiment: base model, named datasets, named stages, pipelines
that chain stages, evaluation, output. Every mistake is reported at once, each with
its path (and line, when it came from the file), before any heavy import.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from posttrain.errors import PosttrainError, RecipeError
from posttrain.recipe.yamlfile import YAML_MAX_BYTES, dotted, problems_error, strict_yaml_load

BASE_PIPELINE = "base"
DATA_FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion",
                "preference", "sharegpt_preference", "hh")
# TRL's DPO loss variants (trl.DPOConfig.loss_type), checked here so a typo fails
# at validate time, not after SFT has trained.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                  "sft", "sigmoid_norm")
# Accepted by TRL's DPOConfig but refused by its trainer with the settings posttrain pins.
UNBUILDABLE_DPO_LOSSES = {
    "exo_pair": "exo_pair needs label smoothing above 0 (TRL refuses it at 0, and posttrain does not expose "
                "label_smoothing yet); choose another loss_type",
}
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
              "polynomial", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")


# The largest whole number any setting takes. Libraries take counts and seeds as C
# integers (torch and tokenizers overflow at 2**64, numpy seeds stop at 2**32 - 1), so
# a larger value is a typo that would crash only after training had started.
INT_MAX = 2**32 - 1
# Seeds go to random, numpy, torch and transformers.set_seed: numpy takes 0..2**32 - 1.
Seed = Annotated[int, Field(ge=0, le=INT_MAX)]
# A name, path or id: an empty one means nothing and fails far from the recipe.
Text = Annotated[str, Field(min_length=1)]


class Strict(BaseModel):
    # allow_inf_nan=False: no float setting takes .inf or .nan (`learning_rate: .inf`
    # passed validation, and `epochs: .inf` crashed `plan`).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _sane_values(cls, value: Any) -> Any:
        """In every spec: every int is at most INT_MAX (see there), and no string holds a
        NUL character (no path, id or name can; C libraries would cut it there). Keys of
        a mapping are names: _name_problems checks them."""
        items = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, int) and not isinstance(item, bool) and abs(item) > INT_MAX:
                raise ValueError(f"must be <= {INT_MAX} (2**32 - 1)")
            if isinstance(item, str) and "\x00" in item:
                raise ValueError(f"{item!r} contains a NUL character")
        return value


class LoraSpec(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # An empty list passed validate and plan, then peft refused it once training started.
    target_modules: Union[Literal["all-linear"], Annotated[list[Text], Field(min_length=1)]] = "all-linear"

    @field_validator("target_modules", mode="wrap")
    @classmethod
    def _targets(cls, value: Any, handler) -> Any:
        """One message for both shapes (pydantic would report each union member apart)."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("must be all-linear or a non-empty list of module names "
                             "(e.g. [q_proj, v_proj])") from None


class ModelSpec(Strict):
    name: Text = Field(description="builtin:<size>, a hub id, or a local directory")
    revision: str | None = None
    chat_template: Literal["chatml", "model"] = "chatml"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    trust_remote_code: bool = False
    lora: LoraSpec | None = None


DEFAULT_REFUSAL_PATTERNS = (
    r"\bas an ai(?: language model)?\b", r"\bi(?: am|'m) (?:sorry|unable)\b", r"\bi cannot (?:help|assist)\b",
    r"\bi can't (?:help|assist)\b",
)


class SelectSpec(Strict):
    strategy: Literal["random", "longest", "ifd", "diverse"]
    n: int = Field(gt=0, description="keep this many examples (all if fewer remain)")
    scorer: str | None = Field(None, description="ifd/diverse: model to score with (default: the recipe's model)")


class CurateSpec(Strict):
    """Curation steps, applied in this order; each counts what it removes and why."""

    normalize: bool = True                     # unicode NFKC + whitespace collapse (for comparison only)
    dedup: Literal["none", "exact", "near"] = "exact"   # near = exact + MinHash LSH near-duplicates
    near_dup_threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity of word 3-gram shingles")
    min_prompt_tokens: int | None = Field(None, ge=0)
    max_prompt_tokens: int | None = Field(None, gt=0)
    min_reply_tokens: int | None = Field(1, ge=0)
    max_reply_tokens: int | None = Field(None, gt=0)
    min_reply_prompt_ratio: float | None = Field(None, ge=0)
    max_reply_prompt_ratio: float | None = Field(None, gt=0)
    drop_refusals: bool = False
    refusal_patterns: list[str] = list(DEFAULT_REFUSAL_PATTERNS)
    decontaminate: bool = False                # against the recipe's eval tasks
    decontaminate_ngram: int = Field(13, gt=0)
    drop_identical_pairs: bool = True          # preference: chosen == rejected
    min_score_margin: float | None = Field(None, ge=0, description="preference rows with scores")
    select: SelectSpec | None = None


class MixPart(Strict):
    data: str = Field(description="name of another dataset of the recipe")
    weight: float | None = Field(None, gt=0)
    cap: int | None = Field(None, gt=0)


class DataSpec(Strict):
    source: Text | None = Field(None, description="builtin:<name>, a local file, or a hub dataset id")
    mix: list[MixPart] | None = Field(None, min_length=1, description="build this dataset from others")
    size: int | None = Field(None, gt=0, description="mix: total rows (with weights)")
    curate: CurateSpec | None = None
    format: Literal[DATA_FORMATS] = "auto"  # type: ignore[valid-type]
    split: Text = "train"
    on_bad_rows: Literal["error", "skip"] = "error"
    limit: int | None = Field(None, gt=0, description="use only the first N rows")


    @model_validator(mode="after")
    def _source_or_mix(self) -> "DataSpec":
        if (self.source is None) == (self.mix is None):
            raise ValueError("give exactly one of source or mix")
        return self


class StageBase(Strict):
    data: str
    learning_rate: float = Field(gt=0)
    # Bounded so that epochs x steps per epoch stays a finite integer (1e308 overflowed `plan`).
    epochs: float = Field(1.0, gt=0, le=100_000)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    batch_size: int = Field(8, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    max_length: int = Field(512, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    scheduler: Literal[SCHEDULERS] = "linear"  # type: ignore[valid-type]
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: Seed | None = Field(None, description="default: the recipe's seed for this run")
    lora: LoraSpec | Literal[False] | None = Field(
        None, description="None: the model's LoRA setting; false: full fine-tuning")
    logging_steps: int = Field(10, gt=0)

    @field_validator("lora", mode="wrap")
    @classmethod
    def _lora(cls, value: Any, handler) -> Any:
        """Errors under the key the user wrote (`stages.sft.lora.r`), not once per union
        member (`lora.LoraSpec.r` beside `lora.literal[False]`)."""
        if isinstance(value, dict):
            return LoraSpec.model_validate(value)
        if value is None or value is False or isinstance(value, LoraSpec):
            return handler(value)
        raise ValueError("must be a mapping of LoRA settings ({r: 16, alpha: 32, target_modules: all-linear}), "
                         "false (full fine-tuning) or null (the model's setting)")


class SFTStage(StageBase):
    method: Literal["sft"]


class DPOStage(StageBase):
    method: Literal["dpo"]
    beta: float = Field(0.1, gt=0)
    loss_type: Literal[DPO_LOSS_TYPES] = "sigmoid"  # type: ignore[valid-type]
    precompute_ref_log_probs: bool = True

    @field_validator("loss_type")
    @classmethod
    def _trl_builds_it(cls, value: str) -> str:
        # TRL 1.16 refuses exo_pair when the trainer is built unless label_smoothing > 0,
        # which the stage pins to 0: refused here, not after the stages before it trained.
        if value in UNBUILDABLE_DPO_LOSSES:
            raise ValueError(UNBUILDABLE_DPO_LOSSES[value])
        return value


class ORPOStage(StageBase):
    method: Literal["orpo"]
    beta: float = Field(0.1, gt=0)


Stage = Annotated[Union[SFTStage, DPOStage, ORPOStage], Field(discriminator="method")]
STAGE_METHODS = ("sft", "dpo", "orpo")


class EvalSpec(Strict):
    tasks: list[Text] = Field(min_length=1)
    preferences: DataSpec | None = Field(
        None, description="held-out preference pairs: how often each model prefers chosen over rejected")
    samples: int = Field(5, ge=0, description="held-out prompts shown with every pipeline's reply")
    apply_chat_template: bool = True
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(32, gt=0)
    limit: int | None = Field(None, gt=0, description="evaluate only the first N items per task")
    max_gen_toks: int | None = Field(None, gt=0)


class OutputSpec(Strict):
    dir: str = "runs"
    # Training checkpoints, so an interrupted run resumes the unfinished stage. Every
    # `checkpoint_minutes` of training (null: never by time) and/or every
    # `checkpoint_steps` optimizer steps; not part of a stage's identity.
    checkpoint_minutes: float | None = Field(10.0, gt=0)
    checkpoint_steps: int | None = Field(None, gt=0)


class ReportSpec(Strict):
    baseline: str | None = Field(None, description="default: the first trained pipeline")
    confidence: float = Field(0.95, gt=0, lt=1)
    # stats draws (resamples x items) bootstrap weights per metric: 100,000 x 1,000
    # items is 800 MB, a bound memory can still take.
    resamples: int = Field(2000, ge=100, le=100_000)


class CompareSpec(Strict):
    """Compute matching between methods.

    `match: tokens`: set the step count of single-step methods (ORPO) so their train
    tokens match the reference multi-stage pipeline; default reference: the first
    pipeline with the most stages. The engine does the matching; see
    `matched_pipelines` for which pipelines are matched to which.
    """

    match: Literal["tokens"]
    reference: str | None = Field(None, description="a pipeline (after sweep expansion)")


class WandbSpec(Strict):
    project: str = "posttrain"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    tags: list[str] = []


class TrackingSpec(Strict):
    wandb: WandbSpec | None = None


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    seeds: list[Seed] = Field([0], min_length=1)
    model: ModelSpec
    data: dict[str, DataSpec] = Field(min_length=1)
    stages: dict[str, Stage] = Field(min_length=1)
    pipelines: dict[str, list[str]] = Field(min_length=1)
    eval: EvalSpec
    external: dict[str, Text] = Field(
        {}, description="extra rows: name -> hub id or local model dir, evaluated with the same spec")
    output: OutputSpec = OutputSpec()
    report: ReportSpec = ReportSpec()
    tracking: TrackingSpec = TrackingSpec()
    compare: CompareSpec | None = None
    # A grid over stage settings, `stages.<stage>.<field>: [values]` (several keys: the
    # cartesian product). validate_recipe expands it into variant stages and pipelines
    # (see expand_sweep) before this model is built, so a Recipe always holds the
    # expanded grid and `sweep` is `{}`: the dumped recipe reproduces the run alone.
    sweep: dict[str, list[Any]] = {}

    @field_validator("sweep")
    @classmethod
    def _sweep_expanded(cls, sweep: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if sweep:
            raise ValueError("a sweep is expanded by load_recipe/validate_recipe, not by Recipe itself")
        return sweep

    @field_validator("name")
    @classmethod
    def _path_name(cls, name: str) -> str:
        from posttrain.artifacts import name_problem

        problem = name_problem(name)  # it names the run directory
        if problem:
            raise ValueError(problem)
        return name

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be unique")
        return seeds


def reference_problems(raw: dict):
    """Cross-references a field type cannot check: names that must exist.

    Runs on the raw mapping, beside pydantic, so these are reported together with
    field errors rather than only after every field is valid. Yields
    `(dotted path, message)`; the sweep is checked here too (see `plan_sweep`).
    """
    for loc, message in _cross_problems(raw):
        yield dotted(loc), message


def _cross_problems(raw: dict):
    """`reference_problems` with each place as a key tuple (for line lookup)."""
    def mapping(key):
        value = raw.get(key)
        return value if isinstance(value, dict) else {}

    data, stages, pipelines = mapping("data"), mapping("stages"), mapping("pipelines")
    yield from _name_problems(raw)
    yield from _builtin_data_problems(raw)
    for name, stage in stages.items():
        ref = stage.get("data") if isinstance(stage, dict) else None
        if isinstance(ref, str) and data and ref not in data:
            yield ("stages", name, "data"), f"unknown dataset {ref!r} (known: {_listed(data)})"
    for name, spec in data.items():
        for i, part in enumerate((spec.get("mix") or []) if isinstance(spec, dict) else []):
            ref = part.get("data") if isinstance(part, dict) else None
            if isinstance(ref, str) and (ref not in data or ref == name):
                yield ("data", name, "mix", i, "data"), f"unknown dataset {ref!r}"
    for name, chain in pipelines.items():
        if not isinstance(chain, list):
            continue
        for i, stage_name in enumerate(chain):
            if isinstance(stage_name, str) and stage_name not in stages:
                yield ("pipelines", name, i), f"unknown stage {stage_name!r} (known: {_listed(stages)})"
        if len(set(map(str, chain))) != len(chain):
            yield ("pipelines", name), "a stage appears twice"
    for name, stage in stages.items():
        if isinstance(stage, dict) and stage.get("method") in ("dpo", "orpo"):
            spec = data.get(stage.get("data"))
            if isinstance(spec, dict) and _is_instruction_data(spec):
                yield (("stages", name, "data"), f"{stage['method']} needs preference data "
                       f"(prompt/chosen/rejected); {stage['data']!r} is instruction data")
    plan, problems = plan_sweep(raw)
    yield from problems
    final = list(plan.chain_of)  # the pipeline names after the sweep
    if pipelines.get(BASE_PIPELINE, []) != []:  # `base: []` (the untrained model alone) is that row itself
        yield ("pipelines", BASE_PIPELINE), (f"{BASE_PIPELINE!r} is reserved for the untrained model's row "
                                             "(and its evals/base folder; `base: []` evaluates it alone); "
                                             "choose another pipeline name")
    for name in mapping("external"):
        if name in final or name == BASE_PIPELINE:
            yield ("external", name), "name already used by a pipeline"
    yield from _case_problems(raw, plan)
    baseline = mapping("report").get("baseline")
    if isinstance(baseline, str) and baseline:
        if baseline in plan.pipelines:
            yield ("report", "baseline"), plan.expanded_message(baseline)
        elif baseline not in {*final, BASE_PIPELINE, *mapping("external")}:
            yield ("report", "baseline"), f"unknown pipeline {baseline!r}"
    compare = raw.get("compare")
    if isinstance(compare, dict):
        yield from _compare_problems(compare, plan, stages)


def _listed(names, most: int = 10) -> str:
    """Names for a message, at most `most` of them (a 1 MB recipe may hold 50,000)."""
    names = [str(name) for name in itertools.islice(names, most + 1)]
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


# Sections whose keys name directories and files: stages/<stage>-s<seed>-<key>,
# evals/<pipeline>/, curated data sets, external models' eval folders.
PATH_NAME_SECTIONS = ("data", "stages", "pipelines", "external")


def _name_problems(raw: dict):
    """Every name that becomes a path must be a safe path component (artifacts.name_problem)."""
    from posttrain.artifacts import name_problem

    for section in PATH_NAME_SECTIONS:
        names = raw.get(section)
        for name in names if isinstance(names, dict) else ():
            problem = name_problem(name)
            if problem:
                yield (section, name), problem


def _case_problems(raw: dict, plan: "SweepPlan"):
    """Names of one kind that differ only in letter case (stages `SFT` and `sft`) name the
    same files on case-insensitive filesystems (macOS, Windows): refused wherever the run goes.

    Kinds: datasets (curated sets), stages (stage folders; the sweep's variants too), and
    pipelines with `external` rows and `base` (evals/<name>/ folders; the sweep's too).
    """
    stages, pipelines = _mapping(raw, "stages"), _mapping(raw, "pipelines")   # dicts: `in` is O(1)
    made_stages = [name for variants in plan.variants.values() for name, _ in variants if name not in stages]
    made_pipelines = [name for name in plan.chain_of if name not in pipelines]
    groups = [  # (where, name, what it is), one group per folder namespace
        [(("data", name), name, "dataset") for name in _mapping(raw, "data")],
        [(("stages", name), name, "stage") for name in stages] + [(("sweep",), name, "stage") for name in made_stages],
        [(None, BASE_PIPELINE, "row of the untrained model")]
        + [(("pipelines", name), name, "pipeline") for name in pipelines]
        + [(("sweep",), name, "pipeline") for name in made_pipelines]
        + [(("external", name), name, "external model") for name in _mapping(raw, "external")],
    ]
    for named in groups:
        first: dict[str, tuple[str, str]] = {}
        for loc, name, what in named:
            if not isinstance(name, str):
                continue
            earlier, earlier_what = first.setdefault(name.casefold(), (name, what))
            if earlier != name and loc is not None:
                made = f"the sweep's {what} " if loc == ("sweep",) else ""
                yield loc, (f"{made}{name!r} and the {earlier_what} {earlier!r} differ only in letter case: on "
                            "case-insensitive filesystems (macOS, Windows) they name the same files; rename one")


def _builtin_data_problems(raw: dict):
    """A `builtin:` dataset exists, has the split named, and is in the format declared.

    A misspelt split once trained on the held-out test pool; a mismatched format gave
    a traceback. Known from posttrain.data.builtin's tables, without generating rows.
    """
    from posttrain.data.builtin import BUILTIN_FORMATS, BUILTIN_SPLITS

    specs = [(("data", name), spec) for name, spec in _mapping(raw, "data").items()]
    specs.append((("eval", "preferences"), _mapping(raw, "eval").get("preferences")))
    for loc, spec in specs:
        source = spec.get("source") if isinstance(spec, dict) else None
        if not isinstance(source, str) or not source.startswith("builtin:"):
            continue
        name = source.removeprefix("builtin:")
        if name not in BUILTIN_SPLITS:
            yield (*loc, "source"), (f"unknown builtin dataset {source!r}; choose one of: "
                                     + ", ".join(f"builtin:{known}" for known in BUILTIN_SPLITS))
            continue
        split, fmt, native = spec.get("split", "train"), spec.get("format", "auto"), BUILTIN_FORMATS[name]
        if isinstance(split, str) and split and split not in BUILTIN_SPLITS[name]:  # "": pydantic says
            yield (*loc, "split"), f"{source} has no split {split!r} (splits: {', '.join(BUILTIN_SPLITS[name])})"
        if fmt in DATA_FORMATS and fmt not in ("auto", native):
            yield (*loc, "format"), f"{source} is in the {native} format; use format: {native} (or auto)"


def _mapping(raw: dict, key: str) -> dict:
    value = raw.get(key)
    return value if isinstance(value, dict) else {}


def _compare_problems(compare: dict, plan: "SweepPlan", stages: dict):
    # final pipeline name -> its chain in the original stage names (same methods)
    chains = {name: chain if isinstance(chain, list) else [] for name, chain in plan.chain_of.items()}
    reference = compare.get("reference")
    if reference is not None:
        if not isinstance(reference, str):
            return  # pydantic reports the type
        if reference in plan.pipelines:
            yield ("compare", "reference"), plan.expanded_message(reference)
            return
        if reference not in chains:
            yield ("compare", "reference"), f"unknown pipeline {reference!r} (pipelines: {', '.join(chains)})"
            return
        if not chains[reference]:
            yield ("compare", "reference"), f"pipeline {reference!r} has no stages"
            return

    def method_of(stage_name):
        stage = stages.get(stage_name) if isinstance(stage_name, str) else None
        return stage.get("method") if isinstance(stage, dict) else None

    reference, matched = _match_plan(chains, method_of, reference)
    if not matched:
        yield ("compare",), "no single-step pipeline (a pipeline of one orpo stage) to match"


def _match_plan(chains: dict[str, list[str]], method_of: Callable[[str], Any],
                reference: str | None) -> tuple[str | None, list[str]]:
    if reference is None:
        longest = max((len(chain) for chain in chains.values()), default=0)
        reference = next((name for name, chain in chains.items() if longest and len(chain) == longest), None)
    matched = [name for name, chain in chains.items()
               if name != reference and len(chain) == 1 and method_of(chain[0]) == "orpo"]
    return reference, matched


def matched_pipelines(recipe: "Recipe") -> tuple[str, list[str]]:
    """Which pipelines `compare: {match: tokens}` matches, and to which reference.

    Returns `(reference, matched)`: the reference pipeline (`compare.reference`, else
    the first pipeline with the most stages) and, in recipe order, every other
    pipeline that is a single ORPO stage; the engine sets each matched pipeline's
    step count so that its train tokens equal the reference's. Pure: reads the
    (expanded) recipe only. Raises ValueError when no pipeline has a stage.
    """
    reference = recipe.compare.reference if recipe.compare else None
    reference, matched = _match_plan({name: list(chain) for name, chain in recipe.pipelines.items()},
                                     lambda stage: recipe.stages[stage].method, reference)
    if reference is None:
        raise ValueError("no pipeline has a stage to use as the reference")
    return reference, matched


# ---------------------------------------------------------------- sweep

SWEEP_MAX_POINTS = 64
_SWEEP_KEY_HELP = "only stage settings can be swept (stages.<stage>.<field>)"


class SweepPlan:
    """How a recipe's `sweep:` expands (built from the raw mapping by `plan_sweep`).

    `axes`: stage -> {field: values}, in declaration order. `variants`: stage ->
    [(variant stage name, {field: value})], the cartesian product of its axes.
    `pipelines`: each expanded pipeline -> [(new name, new chain)]. `chain_of`:
    every pipeline name after expansion -> its chain in the original stage names.
    """

    def __init__(self):
        self.axes: dict[str, dict[str, list]] = {}
        self.variants: dict[str, list[tuple[str, dict]]] = {}
        self.pipelines: dict[str, list[tuple[str, list[str]]]] = {}
        self.chain_of: dict[str, Any] = {}

    def expanded_message(self, name: str) -> str:
        names = ", ".join(new for new, _ in self.pipelines[name])
        return f"{name!r} is expanded by the sweep; name one of: {names}"


def sweep_value_label(value: Any) -> str:
    """A swept value as it appears in names: floats `format(v, 'g')`, others `str(v)`."""
    return format(value, "g") if isinstance(value, float) else str(value)


def _sweep_key(parts: tuple[str, ...]) -> tuple[str, ...]:
    """("stages", "dpo", "beta") for `stages.dpo.beta`; a dotted stage name stays one part."""
    if len(parts) >= 3 and parts[0] == "stages":
        return ("stages", ".".join(parts[1:-1]), parts[-1])
    return parts


def _flatten_sweep(node: dict, prefix: tuple = ()):
    """Nested mappings (`-o sweep.stages.dpo.beta=[...]`) into dotted keys; later wins."""
    out: dict[tuple, Any] = {}
    for key, value in node.items():
        parts = prefix + tuple(str(key).split("."))
        if isinstance(value, dict) and value:
            out.update(_flatten_sweep(value, parts))
        else:
            out[parts] = value
    return out


def plan_sweep(raw: dict) -> tuple[SweepPlan, list[tuple[tuple, str]]]:
    """Check the raw recipe's `sweep:` and plan its expansion: (plan, problems).

    The plan covers the valid sweep keys even when there are problems, so that names
    elsewhere (report.baseline) are checked against the expanded pipelines.
    """
    plan, problems = SweepPlan(), []
    stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    pipelines = raw.get("pipelines") if isinstance(raw.get("pipelines"), dict) else {}
    plan.chain_of = dict(pipelines)  # until expanded below
    sweep = raw.get("sweep")
    if sweep is None or sweep == {}:
        return plan, problems
    if not isinstance(sweep, dict):
        return plan, [(("sweep",), "must be a mapping of stages.<stage>.<field> to lists of values")]
    from posttrain.artifacts import name_problem

    models = {"sft": SFTStage, "dpo": DPOStage, "orpo": ORPOStage}

    for parts, values in _flatten_sweep(sweep).items():
        key = _sweep_key(parts)
        where = ("sweep", *key)
        if len(key) != 3 or key[0] != "stages" or not all(key):
            problems.append((where, _SWEEP_KEY_HELP))
            continue
        _, stage_name, field = key
        if stage_name not in stages:
            problems.append((where, f"unknown stage {stage_name!r} (known: {', '.join(map(str, stages))})"))
            continue
        stage = stages[stage_name]
        model = models.get(stage.get("method")) if isinstance(stage, dict) else None
        if model is None:
            continue  # the stage itself is reported
        if field == "method":
            problems.append((where, "the method cannot be swept (declare another stage)"))
            continue
        if field not in model.model_fields:
            problems.append((where, f"unknown setting {field!r} of a {stage['method']} stage "
                                    f"(settings: {', '.join(f for f in model.model_fields if f != 'method')})"))
            continue
        if not isinstance(values, list):
            problems.append((where, "must be a list of values"))
            continue
        if not values:
            problems.append((where, "must not be empty"))
            continue
        if len(values) > SWEEP_MAX_POINTS:  # too many whatever they are: the grid size is reported below
            plan.axes.setdefault(stage_name, {})[field] = values
            continue
        seen: dict[str, int] = {}
        values = list(values)
        for i, value in enumerate(values):
            value_problems, values[i] = _check_variant(model, stage, stage_name, field, value, data)
            problems += [((*where, i, *loc), message) for loc, message in value_problems]
            label = sweep_value_label(values[i])
            if label in seen:
                problems.append(((*where, i), f"same as [{seen[label]}] ({label}); sweep distinct values"))
            elif name_problem(f"{stage_name}[{field}={label}]") and not name_problem(stage_name):
                problems.append(((*where, i), f"{label!r} cannot be part of the stage name it makes: "
                                              + name_problem(f"{stage_name}[{field}={label}]")))
            seen.setdefault(label, i)
        # Planned even with bad values (nothing is expanded while there are problems),
        # so the names that refer to expanded pipelines are checked at the same time.
        plan.axes.setdefault(stage_name, {})[field] = values

    chains = {name: [s for s in chain if isinstance(s, str)] if isinstance(chain, list) else []
              for name, chain in pipelines.items()}
    used = {s for chain in chains.values() for s in chain}
    for stage_name in plan.axes:
        if stage_name not in used and isinstance(raw.get("pipelines"), dict):
            problems.append((("sweep", "stages", stage_name), f"stage {stage_name!r} is in no pipeline"))

    # Grid points: the pipelines the sweep makes. Counted first (arithmetic), so a
    # typo cannot make the expansion itself blow up.
    counts = {s: math.prod(len(v) for v in axes.values()) for s, axes in plan.axes.items()}
    total = sum(math.prod(counts[s] for s in chain if s in counts)
                for chain in chains.values() if any(s in counts for s in chain))
    if total > SWEEP_MAX_POINTS:
        problems.append((("sweep",), f"{total} grid points; at most {SWEEP_MAX_POINTS}"))
        plan.axes = {}
        return plan, problems

    for stage_name, axes in plan.axes.items():
        fields = list(axes)
        plan.variants[stage_name] = [
            (f"{stage_name}[{','.join(f'{f}={sweep_value_label(v)}' for f, v in zip(fields, combo))}]",
             dict(zip(fields, combo)))
            for combo in itertools.product(*axes.values())]
    plan.chain_of = {}
    for name, chain in pipelines.items():
        swept = [s for s in chains[name] if s in plan.variants]
        if not swept:
            plan.chain_of[name] = chain
            continue
        field_count: dict[str, int] = {}
        for s in swept:
            for f in plan.axes[s]:
                field_count[f] = field_count.get(f, 0) + 1
        plan.pipelines[name] = []
        for combo in itertools.product(*(plan.variants[s] for s in swept)):
            chosen = dict(zip(swept, combo))
            label = ",".join(f"{s + '.' if field_count[f] > 1 else ''}{f}={sweep_value_label(v)}"
                             for s in swept for f, v in chosen[s][1].items())
            new_name = f"{name}[{label}]"
            plan.pipelines[name].append(
                (new_name, [chosen[s][0] if isinstance(s, str) and s in chosen else s for s in chain]))
            plan.chain_of[new_name] = chain
    # Collisions with names the recipe already uses.
    new_pipelines = [new for expanded in plan.pipelines.values() for new, _ in expanded]
    for name in new_pipelines:
        if name in pipelines:
            problems.append((("sweep",), f"the sweep's pipeline {name!r} is already a pipeline of the recipe"))
    for variants in plan.variants.values():
        for name, _ in variants:
            if name in stages:
                problems.append((("sweep",), f"the sweep's stage {name!r} is already a stage of the recipe"))
    return plan, problems + _sweep_name_problems(plan, problems)


def _sweep_name_problems(plan: "SweepPlan", problems: list) -> list[tuple[tuple, str]]:
    """The stage and pipeline names the sweep makes are path names too (a long grid
    makes long names). Checked when no value was refused already (one message each)."""
    from posttrain.artifacts import name_problem

    if any(loc[:2] == ("sweep", "stages") for loc, _ in problems):
        return []
    made = [("stage", base, name) for base, variants in plan.variants.items() for name, _ in variants]
    made += [("pipeline", base, name) for base, expanded in plan.pipelines.items() for name, _ in expanded]
    return [(("sweep",), f"a {kind} the sweep makes: {name_problem(name)}")
            for kind, base, name in made if name_problem(name) and not name_problem(base)]


def _check_variant(model: type, stage: dict, stage_name: str, field: str, value: Any, data: dict):
    """One swept value: (its problems as (loc below the value, message), the value).

    The value comes back as the stage schema reads it when that is a plain scalar
    (`"1e-5"`, a string to YAML 1.1, becomes 1e-05), so names and stages agree.
    """
    problems = []
    variant = {**stage, field: value}
    try:
        parsed = getattr(model.model_validate(variant), field)
        if parsed is None or isinstance(parsed, (bool, int, float, str)):
            value = parsed
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            if loc[:1] == (field,):
                problems.append((loc[1:], _MESSAGES.get(err["type"], lambda e: e["msg"])(err)))
    # Names a field type cannot check (a swept `data:` must be a fitting dataset).
    for loc, message in _cross_problems({"data": data, "stages": {stage_name: variant}}):
        if loc[:3] == ("stages", stage_name, field):
            problems.append((loc[3:], message))
    return problems, value


def expand_sweep(raw: dict, plan: SweepPlan) -> dict:
    """The raw recipe with the sweep applied: variant stages and pipelines, `sweep` gone.

    Each swept stage is replaced, in place, by its variants (the original with the
    swept fields set); each pipeline that uses swept stages is replaced, in place, by
    one pipeline per combination of their variants. An original swept stage stays
    only if a pipeline that was not expanded still uses it; other stages are kept.
    """
    raw = {key: value for key, value in raw.items() if key != "sweep"}
    if not plan.variants:
        return raw
    pipelines = {}
    for name, chain in raw["pipelines"].items():
        if name in plan.pipelines:
            pipelines.update(plan.pipelines[name])
        else:
            pipelines[name] = chain
    used = {s for chain in pipelines.values() if isinstance(chain, list) for s in chain if isinstance(s, str)}
    stages = {}
    for name, stage in raw["stages"].items():
        if name in plan.variants:
            if name in used:
                stages[name] = stage
            stages.update({new: {**stage, **fields} for new, fields in plan.variants[name]})
        else:
            stages[name] = stage
    return {**raw, "stages": stages, "pipelines": pipelines}


def _sweep_lines(lines: dict[tuple, int]) -> dict[tuple, int]:
    """Add each sweep key's line under its canonical path (flat and nested forms alike)."""
    extra, canonical = {}, {}  # canonical: the key's leading names -> their canonical path
    for key, line in lines.items():
        if len(key) < 2 or key[0] != "sweep":
            continue
        n = next((i for i, part in enumerate(key) if not isinstance(part, str)), len(key))
        if key[:n] not in canonical:
            canonical[key[:n]] = ("sweep", *_sweep_key(tuple(".".join(key[1:n]).split("."))))
        extra[(*canonical[key[:n]], *key[n:])] = line
    return {**extra, **lines}


def _is_instruction_data(spec: dict) -> bool:
    from posttrain.data.builtin import BUILTIN_FORMATS
    from posttrain.data.formats import FORMATS

    source = spec.get("source")
    if isinstance(source, str) and source.startswith("builtin:") and source[8:] in BUILTIN_FORMATS:
        return FORMATS[BUILTIN_FORMATS[source[8:]]] == "instruction"
    return FORMATS.get(spec.get("format", "auto")) == "instruction"


# ---------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError listing every problem."""
    path = Path(path)
    if not path.is_file():  # a FIFO or a device would block or never end
        raise RecipeError(f"recipe not found: {path}" if not path.exists()
                          else f"{path}: not a regular file (a recipe is a YAML file)")
    try:
        with path.open("rb") as file:  # never more than the limit, whatever the file is
            text = file.read(YAML_MAX_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read: {exc.strerror or exc}") from None
    raw, lines = strict_yaml_load(text, path.name)
    if not isinstance(raw, dict):
        raise RecipeError(f"{path.name}: a recipe is a mapping (name:, model:, data:, ...)")
    raw = apply_overrides(raw, overrides, path.name)
    return validate_recipe(raw, path.name, lines)


def validate_recipe(raw: dict, where: str, lines: dict[tuple, int] | None = None) -> Recipe:
    """Validate a raw recipe mapping; raise RecipeError listing every problem.

    A `sweep:` is checked with everything else, then expanded (`expand_sweep`): the
    Recipe returned holds the variant stages and pipelines, and `sweep` is `{}`.
    """
    lines = _sweep_lines(lines or {})
    problems: list[tuple[tuple, str]] = []
    unswept = {key: value for key, value in raw.items() if key != "sweep"}
    try:
        Recipe.model_validate(unswept)
    except ValidationError as exc:
        problems += _pydantic_problems(exc)
    problems += _cross_problems(raw)
    if problems:
        raise problems_error(where, problems, lines)
    plan, _ = plan_sweep(raw)
    try:
        return Recipe.model_validate(expand_sweep(unswept, plan))
    except ValidationError as exc:  # not expected: every swept value was checked above
        raise problems_error(where, _pydantic_problems(exc), lines) from None


def _pydantic_problems(exc: ValidationError) -> list[tuple[tuple, str]]:
    return [(_strip_union_tags(err["loc"]), _MESSAGES.get(err["type"], lambda e: e["msg"])(err))
            for err in exc.errors()
            # a name that is not a string: _name_problems says so, with the naming rule
            if not (len(err["loc"]) == 3 and err["loc"][0] in PATH_NAME_SECTIONS and err["loc"][2] == "[key]")]


def _strip_union_tags(loc: tuple) -> tuple:
    # pydantic puts the discriminator value into the path (stages.dpo.dpo.beta); drop it.
    loc = tuple(loc)
    if len(loc) >= 3 and loc[0] == "stages" and loc[2] in STAGE_METHODS:
        return loc[:2] + loc[3:]
    return loc




_MESSAGES = {
    "greater_than": lambda e: f"must be > {e['ctx']['gt']}",
    "greater_than_equal": lambda e: f"must be >= {e['ctx']['ge']}",
    "less_than": lambda e: f"must be < {e['ctx']['lt']}",
    "less_than_equal": lambda e: f"must be <= {e['ctx']['le']}",
    "finite_number": lambda e: "must be a finite number (not .inf or .nan)",
    "extra_forbidden": lambda e: "unknown key",
    "missing": lambda e: "required",
    "literal_error": lambda e: f"must be one of {e['ctx']['expected']}",
    "union_tag_invalid": lambda e: f"unknown method {e['ctx']['tag']!r} (use {e['ctx']['expected_tags']})",
    "union_tag_not_found": lambda e: "missing 'method' (sft, dpo or orpo)",
    "value_error": lambda e: str(e["ctx"]["error"]),
    "too_short": lambda e: "must not be empty",
    "string_too_short": lambda e: "must not be empty",
}


# ---------------------------------------------------------------- overrides


def apply_overrides(raw: dict, overrides: list[str], where: str = "recipe") -> dict:
    """Apply `-o dotted.key=value` overrides; values are parsed as YAML (0.2, [0,1], true).

    A missing or null mapping on the way is created (`-o model.lora.r=8`); every
    malformed override is reported, each naming itself.
    """
    import copy

    if not overrides:
        return raw
    raw = copy.deepcopy(raw)  # the caller's mapping stays as it was
    problems = []
    for override in overrides:
        problem = _apply_override(raw, override)
        if problem:
            shown = override if len(override) <= 200 else f"{override[:100]}... ({len(override):,} characters)"
            problems.append(f"-o {shown}: {problem}")
    if problems:
        raise RecipeError(f"{where}: bad override(s)", problems)
    return raw


def _apply_override(raw: dict, override: str) -> str | None:
    """Set one override in `raw`; why it cannot be applied, or None."""
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep:
        return "expected dotted.key=value (e.g. -o stages.dpo.beta=0.2)"
    if not all(part.strip() for part in parts):
        return f"the key {key!r} has an empty part; expected dotted.key=value (e.g. -o stages.dpo.beta=0.2)"
    try:
        value, _ = strict_yaml_load(text, "value")
    except PosttrainError as exc:
        detail = re.sub(r"^value(:\d+)?: (not valid YAML: |\(top\): )?", "", (exc.problems or [str(exc)])[0].strip())
        return f"the value is not valid YAML ({detail}); quote a string value: -o '{key}=\"...\"'"
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            kind = "a list" if isinstance(child, list) else f"{type(child).__name__} {child!r}"
            where = ".".join(parts[:depth + 1])
            return (f"{where} is {kind}, not a mapping: it has no key {parts[depth + 1]!r}"
                    + (f"; set the whole list (-o '{where}=[...]')" if isinstance(child, list) else ""))
        node = child
    node[parts[-1]] = value
    return None


# ---------------------------------------------------------------- helpers


def pipelines_with_base(recipe: Recipe) -> dict[str, list[str]]:
    """Every declared pipeline plus `base` (the untrained model), base first."""
    pipelines = {BASE_PIPELINE: []}
    pipelines.update({name: list(chain) for name, chain in recipe.pipelines.items() if chain})
    for name, chain in recipe.pipelines.items():
        if not chain and name != BASE_PIPELINE:
            pipelines[name] = []
    return pipelines


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def resolve_lora(recipe: Recipe, stage: Any) -> LoraSpec | None:
    """A stage's LoRA: its own setting, else the model's; `false` forces full fine-tuning."""
    if stage.lora is False:
        return None
    return stage.lora or recipe.model.lora
