"""The recipe schema (pydantic v2, strict): model, data, stages, pipelines, eval, output.

A recipe is the experiment: base model, named datasets, named stages, pipelines
that chain stages, evaluation, output. The stage union is built from the methods
under `posttrain/stages/` (each declares its settings class). Checks a field type
cannot make live in `references`, sweeps in `sweep`, loading in `load`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, PrivateAttr, field_validator, model_validator

from posttrain.recipe.fields import LoraSpec, ResourcesSpec, Seed, Strict, Text
from posttrain.stages import METHODS

BASE_PIPELINE = "base"
DATA_FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion",
                "preference", "sharegpt_preference", "messages_preference", "hh", "unpaired")


class QuantizationSpec(Strict):
    """QLoRA: the base model's linear weights loaded in 4 bits by bitsandbytes (a CUDA GPU
    and the `qlora` extra), LoRA adapters trained on top in `compute_dtype`."""

    bits: Literal[4] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class ModelSpec(Strict):
    name: Text = Field(description="builtin:<size>, a hub id, or a local directory")
    revision: str | None = None
    chat_template: Text = Field("chatml", description=(
        "chatml (posttrain's, tokens added if missing), model (the tokenizer's own), "
        "a Jinja template, or a template file (.jinja, relative to the recipe)"))
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    trust_remote_code: bool = False
    lora: LoraSpec | None = None
    quantization: QuantizationSpec | None = Field(None, description="QLoRA: 4-bit base weights (needs LoRA, a GPU)")
    attn_implementation: Text | None = Field(None, description="sdpa, eager, flash_attention_2, ... (default: "
                                                                "transformers' choice)")
    _base_dir: Path | None = PrivateAttr(None)   # the recipe's folder (load_recipe sets it)

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str) -> str:
        from posttrain.models import is_jinja

        if value in ("chatml", "model") or is_jinja(value) or value.endswith(TEMPLATE_SUFFIXES):
            return value
        raise ValueError("use chatml, model, a Jinja template (text with {{ }} or {% %}), or a template file "
                         f"({', '.join(TEMPLATE_SUFFIXES)})")

    def __eq__(self, other: object) -> bool:   # the recipe's folder (private) is where, not what
        return isinstance(other, ModelSpec) and self.model_dump() == other.model_dump()

    def __hash__(self) -> int:
        return hash(self.model_dump_json())

    def template_file(self) -> Path | None:
        """The template file chat_template names (relative to the recipe's folder), or None."""
        from posttrain.models import is_jinja

        if self.chat_template in ("chatml", "model") or is_jinja(self.chat_template):
            return None
        path = Path(self.chat_template).expanduser()
        return path if path.is_absolute() else (self._base_dir or Path.cwd()) / path

    def template_choice(self) -> str:
        """chatml, model, or the Jinja template's text (a template file read)."""
        path = self.template_file()
        if path is None:
            return self.chat_template
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:   # check_static said so before; a file changed since
            from posttrain.errors import RecipeError

            raise RecipeError(f"model.chat_template: cannot read {path}: {exc}") from None


TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2")


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
    subset: Text | None = Field(None, description="a hub dataset's subset (config name), e.g. smoltalk's 'all'")
    on_bad_rows: Literal["error", "skip"] = "error"
    limit: int | None = Field(None, gt=0, description="use only the first N rows")


    @model_validator(mode="after")
    def _source_or_mix(self) -> "DataSpec":
        if (self.source is None) == (self.mix is None):
            raise ValueError("give exactly one of source or mix")
        return self



# The tagged union of every method's settings (see posttrain.stages.METHODS).
Stage = Annotated[Union[tuple(method.settings for method in METHODS.values())], Field(discriminator="method")]


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
    save_total_limit: int = Field(2, gt=0, description="the newest checkpoints kept while a stage trains")


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


class DistributedSpec(Strict):
    """How the processes of a multi-process run share each stage (posttrain.distributed):
    auto picks by the model's size and the GPUs at run time (see `choose_strategy`)."""

    strategy: Literal["auto", "ddp", "fsdp2", "zero2", "zero3"] = "auto"
    accelerate_config: Text | None = Field(None, description=(
        "an accelerate config file (relative to the recipe) for `posttrain run --gpus N`; its strategy must be "
        "the recipe's (auto follows it)"))

    def config_file(self, base_dir: Path) -> Path | None:
        """The accelerate config file, a relative path taken from the recipe's folder `base_dir`."""
        if self.accelerate_config is None:
            return None
        path = Path(self.accelerate_config).expanduser()
        return path if path.is_absolute() else Path(base_dir) / path


class TrackingSpec(Strict):
    wandb: WandbSpec | None = None
    tensorboard: bool = Field(False, description="training curves also to <run>/tensorboard (needs tensorboard)")


class ClusterResources(ResourcesSpec):
    """The recipe's `resources:`: every cluster job's defaults (a stage's own `resources:`
    overrides them key by key), and the data-preparation and evaluation jobs' own."""

    prepare: ResourcesSpec | None = Field(None, description="the data preparation job (default: no GPU)")
    evaluate: ResourcesSpec | None = Field(None, description="the evaluation and report job")


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
    distributed: DistributedSpec = DistributedSpec()
    resources: ClusterResources = Field(ClusterResources(), description="cluster jobs (--executor slurm); in no key")
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
