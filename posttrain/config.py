"""The recipe schema (pydantic v2, strict) and its loading, overrides and errors.

A recipe is the experiment: base model, named datasets, named stages, pipelines
that chain stages, evaluation, output. Every mistake is reported at once, each with
its path (and line, when it came from the file), before any heavy import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from posttrain.errors import RecipeError

BASE_PIPELINE = "base"
DATA_FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion",
                "preference", "sharegpt_preference", "hh")
# TRL's DPO loss variants (trl.DPOConfig.loss_type), checked here so a typo fails
# at validate time, not after SFT has trained.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                  "sft", "sigmoid_norm")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
              "polynomial", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSpec(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"


class ModelSpec(Strict):
    name: str = Field(description="builtin:<size>, a hub id, or a local directory")
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
    source: str | None = Field(None, description="builtin:<name>, a local file, or a hub dataset id")
    mix: list[MixPart] | None = Field(None, min_length=1, description="build this dataset from others")
    size: int | None = Field(None, gt=0, description="mix: total rows (with weights)")
    curate: CurateSpec | None = None
    format: Literal[DATA_FORMATS] = "auto"  # type: ignore[valid-type]
    split: str = "train"
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
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    batch_size: int = Field(8, gt=0)
    gradient_accumulation: int = Field(1, gt=0)
    max_length: int = Field(512, gt=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    scheduler: Literal[SCHEDULERS] = "linear"  # type: ignore[valid-type]
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int | None = Field(None, description="default: the recipe's seed for this run")
    lora: LoraSpec | Literal[False] | None = Field(
        None, description="None: the model's LoRA setting; false: full fine-tuning")
    logging_steps: int = Field(10, gt=0)


class SFTStage(StageBase):
    method: Literal["sft"]


class DPOStage(StageBase):
    method: Literal["dpo"]
    beta: float = Field(0.1, gt=0)
    loss_type: Literal[DPO_LOSS_TYPES] = "sigmoid"  # type: ignore[valid-type]
    precompute_ref_log_probs: bool = True


class ORPOStage(StageBase):
    method: Literal["orpo"]
    beta: float = Field(0.1, gt=0)


Stage = Annotated[Union[SFTStage, DPOStage, ORPOStage], Field(discriminator="method")]
STAGE_METHODS = ("sft", "dpo", "orpo")


class EvalSpec(Strict):
    tasks: list[str] = Field(min_length=1)
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


class ReportSpec(Strict):
    baseline: str | None = Field(None, description="default: the first trained pipeline")
    confidence: float = Field(0.95, gt=0, lt=1)
    resamples: int = Field(2000, ge=100)


class WandbSpec(Strict):
    project: str = "posttrain"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    tags: list[str] = []


class TrackingSpec(Strict):
    wandb: WandbSpec | None = None


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    seeds: list[int] = Field([0], min_length=1)
    model: ModelSpec
    data: dict[str, DataSpec] = Field(min_length=1)
    stages: dict[str, Stage] = Field(min_length=1)
    pipelines: dict[str, list[str]] = Field(min_length=1)
    eval: EvalSpec
    external: dict[str, str] = Field(
        {}, description="extra rows: name -> hub id or local model dir, evaluated with the same spec")
    output: OutputSpec = OutputSpec()
    report: ReportSpec = ReportSpec()
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be unique")
        return seeds


def reference_problems(raw: dict):
    """Cross-references a field type cannot check: names that must exist.

    Runs on the raw mapping, beside pydantic, so these are reported together with
    field errors rather than only after every field is valid.
    """
    def mapping(key):
        value = raw.get(key)
        return value if isinstance(value, dict) else {}

    data, stages, pipelines = mapping("data"), mapping("stages"), mapping("pipelines")
    for name, stage in stages.items():
        ref = stage.get("data") if isinstance(stage, dict) else None
        if isinstance(ref, str) and data and ref not in data:
            yield f"stages.{name}.data", f"unknown dataset {ref!r} (known: {', '.join(data)})"
    for name, spec in data.items():
        for i, part in enumerate((spec.get("mix") or []) if isinstance(spec, dict) else []):
            ref = part.get("data") if isinstance(part, dict) else None
            if isinstance(ref, str) and (ref not in data or ref == name):
                yield f"data.{name}.mix[{i}].data", f"unknown dataset {ref!r}"
    for name, chain in pipelines.items():
        if not isinstance(chain, list):
            continue
        for i, stage_name in enumerate(chain):
            if isinstance(stage_name, str) and stage_name not in stages:
                yield f"pipelines.{name}[{i}]", f"unknown stage {stage_name!r} (known: {', '.join(stages)})"
        if len(set(map(str, chain))) != len(chain):
            yield f"pipelines.{name}", "a stage appears twice"
    for name, stage in stages.items():
        if isinstance(stage, dict) and stage.get("method") in ("dpo", "orpo"):
            spec = data.get(stage.get("data"))
            if isinstance(spec, dict) and _is_instruction_data(spec):
                yield (f"stages.{name}.data", f"{stage['method']} needs preference data (prompt/chosen/rejected); "
                       f"{stage['data']!r} is instruction data")
    for name in mapping("external"):
        if name in pipelines or name == BASE_PIPELINE:
            yield f"external.{name}", "name already used by a pipeline"
    baseline = mapping("report").get("baseline")
    if baseline and baseline not in {*pipelines, BASE_PIPELINE, *mapping("external")}:
        yield "report.baseline", f"unknown pipeline {baseline!r}"


def _is_instruction_data(spec: dict) -> bool:
    from posttrain.data.formats import FORMATS

    if spec.get("source") == "builtin:skills":
        return True
    return FORMATS.get(spec.get("format", "auto")) == "instruction"


# ---------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path.name}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path.name}: a recipe is a mapping (name:, model:, data:, ...)")
    raw = apply_overrides(raw, overrides, path.name)
    return validate_recipe(raw, path.name, line_index(text))


def validate_recipe(raw: dict, where: str, lines: dict[tuple, int] | None = None) -> Recipe:
    lines = lines or {}
    problems = []
    recipe = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            loc = _strip_union_tags(err["loc"])
            problems.append(_place(loc, where, lines, _MESSAGES.get(err["type"], lambda e: e["msg"])(err)))
    for path, message in reference_problems(raw):
        loc = tuple(int(p) if p.isdigit() else p for p in path.replace("[", ".").replace("]", "").split("."))
        problems.append(_place(loc, where, lines, message, dotted_path=path))
    if problems:
        raise RecipeError(f"{where}: {len(problems)} problem(s)", problems)
    return recipe


def _place(loc: tuple, where: str, lines: dict[tuple, int], message: str, dotted_path: str | None = None) -> str:
    line = _nearest_line(loc, lines)
    place = f"{where}:{line}" if line else where
    return f"{place}: {dotted_path or dotted(loc)}: {message}"


def _strip_union_tags(loc: tuple) -> tuple:
    # pydantic puts the discriminator value into the path (stages.dpo.dpo.beta); drop it.
    loc = tuple(loc)
    if len(loc) >= 3 and loc[0] == "stages" and loc[2] in STAGE_METHODS:
        return loc[:2] + loc[3:]
    return loc


def dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_MESSAGES = {
    "greater_than": lambda e: f"must be > {e['ctx']['gt']}",
    "greater_than_equal": lambda e: f"must be >= {e['ctx']['ge']}",
    "less_than": lambda e: f"must be < {e['ctx']['lt']}",
    "extra_forbidden": lambda e: "unknown key",
    "missing": lambda e: "required",
    "literal_error": lambda e: f"must be one of {e['ctx']['expected']}",
    "union_tag_invalid": lambda e: f"unknown method {e['ctx']['tag']!r} (use {e['ctx']['expected_tags']})",
    "union_tag_not_found": lambda e: "missing 'method' (sft, dpo or orpo)",
    "value_error": lambda e: str(e["ctx"]["error"]),
    "too_short": lambda e: "must not be empty",
}


# ---------------------------------------------------------------- overrides


def apply_overrides(raw: dict, overrides: list[str], where: str = "recipe") -> dict:
    """Apply `-o dotted.key=value` overrides; values are parsed as YAML (0.2, [0,1], true)."""
    import copy

    raw = copy.deepcopy(raw)
    problems = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            problems.append(f"-o {override}: expected dotted.key=value")
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = parsed
    if problems:
        raise RecipeError(f"{where}: bad override(s)", problems)
    return raw


# ---------------------------------------------------------------- YAML lines


def line_index(text: str) -> dict[tuple, int]:
    """Map each key path in the YAML text to its 1-based line, for error messages."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                child = path + (key_node.value,)
                lines[child] = key_node.start_mark.line + 1
                walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    walk(root, ())
    return lines


def _nearest_line(loc: tuple, lines: dict[tuple, int]) -> int | None:
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
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
