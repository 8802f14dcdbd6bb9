"""`posttrain export`: one pipeline of a finished run as a standalone model folder that
plain `transformers` (or `peft`, for an adapter) loads, optionally pushed to the Hub.

The model of a pipeline is rebuilt from the run's records exactly as training and
evaluation built it (`plan.source_after`): the base model at the commit its stage keys
hold, the chat template installed (its added tokens' rows grown) BEFORE any adapter is
merged, then each stage's output in order. What is written:

- `merged` (`--merge`, or a pipeline that ends in a full fine-tune: `full`): the
  weights (safetensors), config and generation config (EOS/pad of the chat template);
- `adapter` (the default when the pipeline is one LoRA stage on a Hub or local base):
  the adapter, its config pointing at the base and its commit;
- always: the chat tokenizer (template, EOS, added tokens), `posttrain_export.json`
  (what it is, deterministic: no timestamps, no local paths but a local base's) and a
  model card `README.md` with the run's evaluation rows for the pipeline.

Two exports of the same pipeline are byte-identical. Files are written into a scratch
folder inside `--out` and moved into place, `posttrain_export.json` last.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from posttrain.artifacts import Area, RunDir
from posttrain.errors import ModelError, PosttrainError
from posttrain.models import ModelSource
from posttrain.records import StageRecord

EXPORT_RECORD = "posttrain_export.json"
EXPORT_FORMAT = 1
SCRATCH = ".posttrain-export-partial"   # inside --out while writing; a leftover is replaced
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


class ExportError(PosttrainError):
    """A run, pipeline, output folder or Hub repository that cannot be exported as asked."""


@dataclass(frozen=True)
class PipelineModel:
    """One (pipeline, seed) of a run: its stage records (in order), each stage's model
    folder in the cache, and the base model as training loaded it."""

    run: RunDir
    recipe: dict                        # the run's resolved recipe, as written
    pipeline: str
    seed: int
    records: tuple[StageRecord, ...]
    model_dirs: tuple[Path, ...]        # <cache>/stages/<key>/model of each record
    base: ModelSource                   # revision: the commit the stage keys hold (hub models)
    weights: str | None                 # key_inputs.weights: commit:<sha>, sha256:<digest>, None (builtin)
    quantization: dict | None = None    # QLoRA: the 4-bit loading the stages trained on (model.quantization)

    @property
    def source(self) -> ModelSource:
        """The pipeline's model, as `plan.source_after` builds it for training and evaluation."""
        source = self.base
        for record, model_dir in zip(self.records, self.model_dirs):
            if record.adapter:
                source = replace(source, adapter_dirs=source.adapter_dirs + (str(model_dir),))
            else:
                source = replace(source, name=str(model_dir), adapter_dirs=(), revision=None)
        return source

    def describe(self) -> str:
        return f"pipeline {self.pipeline!r} (seed {self.seed}) of run {self.run.root}"


# ---------------------------------------------------------------- finding the pipeline


def find_pipeline(run_dir: Path, pipeline: str, seed: int | None, cache_root: Path | None) -> PipelineModel:
    """The pipeline's records and models, or an ExportError saying what is missing."""
    run = open_run(run_dir)
    seed, folders = pipeline_folders(run, pipeline, seed)
    records, model_dirs = [], []
    for folder in folders:
        record = read_stage(run, pipeline, seed, folder)
        records.append(record)
        model_dirs.append(stage_model_dir(record, cache_root))
    from posttrain.report.build import read_recipe

    base, weights = base_source(records, model_dirs[0])
    quantization = (records[0].key_inputs or {}).get("base_model", {}).get("quantization")
    return PipelineModel(run, read_recipe(run), pipeline, seed, tuple(records), tuple(model_dirs), base, weights,
                         quantization if isinstance(quantization, dict) else None)


def open_run(run_dir: Path) -> RunDir:
    from posttrain.artifacts import MARKER, RUN_FORMAT, directory_owner

    run = RunDir(Path(run_dir))
    if not run.root.exists():
        raise ExportError(f"{run_dir}: no such run directory")
    owner = directory_owner(run.root)
    if not owner:
        raise ExportError(f"{run_dir}: not a posttrain run directory (no {MARKER}); give the folder "
                          "`posttrain run` wrote (runs/<name>, or its --out)")
    if run.format > RUN_FORMAT:
        raise ExportError(f"{run_dir}: written by a newer posttrain (run directory format {run.format}); "
                          "update posttrain to export from it")
    if not run.pipelines.is_file():
        raise ExportError(f"{run.pipelines}: missing; the run stopped before it was planned, so it has no "
                          "trained model to export. Run its recipe to the end first")
    return run


def pipeline_folders(run: RunDir, pipeline: str, seed: int | None) -> tuple[int, list[str]]:
    """(seed, the pipeline's stage folders in order) from pipelines.json."""
    from posttrain.records import read_json

    table = read_json(run.pipelines)
    trained = [name for name, seeds in table.items() if isinstance(seeds, dict) and any(seeds.values())]
    if pipeline not in table:
        raise ExportError(f"{run.root}: no pipeline {pipeline!r}; its pipelines: "
                          + (", ".join(trained) or "none with trained stages"))
    seeds = table[pipeline] if isinstance(table[pipeline], dict) else {}
    if not any(seeds.values()):
        raise ExportError(
            f"pipeline {pipeline!r} is the untrained base model: it holds no weights of this run (and with "
            "chat_template: chatml the template's added tokens have placeholder rows it never learned); load it "
            "from its source, or export a trained pipeline: " + (", ".join(trained) or "none in this run"))
    known = sorted(int(s) for s in seeds if s.isdigit() and isinstance(seeds[s], list) and seeds[s])
    if seed is None and len(known) > 1:
        raise ExportError(f"pipeline {pipeline!r} was trained with {len(known)} seeds ({', '.join(map(str, known))}); "
                          "choose one with --seed")
    chosen = known[0] if seed is None and known else seed
    if chosen not in known:
        raise ExportError(f"pipeline {pipeline!r} has no seed {seed}; its seeds: {', '.join(map(str, known))}")
    folders = seeds[str(chosen)]
    if not isinstance(folders, list) or not folders or not all(isinstance(f, str) for f in folders):
        from posttrain.records import DAMAGED_HINT

        raise ExportError(f"{run.pipelines}: {pipeline}/{chosen} is not a list of stage folders ({DAMAGED_HINT})")
    return chosen, folders


def read_stage(run: RunDir, pipeline: str, seed: int, folder: str) -> StageRecord:
    path = run.stage_record(folder)
    if not path.is_file():
        raise ExportError(f"{path}: missing; stage {folder} of pipeline {pipeline!r} (seed {seed}) did not finish "
                          "in this run (see failed.json if there is one). Run the recipe again to finish it "
                          "(finished stages are reused), then export")
    return StageRecord.read(path)


def stage_model_dir(record: StageRecord, cache_root: Path | None) -> Path:
    """The stage's model folder: in the cache the run recorded, else in `cache_root`
    (--cache, $POSTTRAIN_CACHE, the default); verified against its manifest."""
    from posttrain.cache import Cache

    roots = [Path(record.cache_dir).parent.parent] if record.cache_dir else []
    roots.append(Cache(cache_root).root)
    for root in roots:
        verdict = Cache(root).verify("stages", record.key)
        if verdict is None:
            continue
        if verdict.problems:
            raise ExportError(f"stage {record.stage} (seed {record.seed}) {record.key[:12]}: its cache entry is "
                              "corrupt; run the recipe again to retrain it (or `posttrain cache verify --fix`)",
                              verdict.problems)
        return verdict.path / "model"
    where = " or ".join(str(root) for root in dict.fromkeys(roots))
    raise ExportError(
        f"stage {record.stage} (seed {record.seed}), key {record.key[:12]}: not in the cache ({where}); "
        "`posttrain cache gc` or `cache rm` removed it. Run the run's recipe again to rebuild it (stages still "
        "in the cache are reused), then export; give --cache if the cache has moved")


def base_source(records: list[StageRecord], first_model_dir: Path) -> tuple[ModelSource, str | None]:
    """The base model as the first stage's key recorded it, at the commit of its weights."""
    from posttrain.models import is_jinja

    inputs = records[0].key_inputs
    spec = inputs.get("base_model") if isinstance(inputs, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ExportError(f"stage {records[0].stage}: its record predates recorded key inputs (an older "
                          "posttrain); run the recipe again with this version to export it")
    weights = inputs.get("weights")
    template = spec.get("chat_template") or "chatml"
    if template not in ("chatml", "model") and not is_jinja(template):
        template = trained_template(first_model_dir, inputs.get("template"), template)
    revision = weights.removeprefix("commit:") if isinstance(weights, str) and weights.startswith("commit:") \
        else spec.get("revision")
    return ModelSource(name=spec["name"], dtype=spec.get("dtype") or "float32",
                       trust_remote_code=bool(spec.get("trust_remote_code")), revision=revision,
                       chat_template=template), weights


def trained_template(model_dir: Path, identity: str | None, file_name: str) -> str:
    """A template file's text as the stage trained with it: from the tokenizer it saved
    (the file beside the recipe may have changed since), checked against the key's digest."""
    path = model_dir / "chat_template.jinja"
    text = path.read_text(encoding="utf-8") if path.is_file() else None
    if text is None:
        config = model_dir / "tokenizer_config.json"
        text = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    if not isinstance(text, str) or "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16] != identity:
        raise ExportError(f"{model_dir}: the saved tokenizer's chat template is not the {file_name} the stage "
                          "trained with (its digest differs); run the recipe again to rebuild the stage")
    return text


# ---------------------------------------------------------------- what to write


def export_kind(model: PipelineModel, merge: bool) -> str:
    """full (the last stage is a full fine-tune), merged (--merge) or adapter; refuses an
    adapter that is not the whole model, or whose base a plain user cannot load."""
    from posttrain.models import is_builtin

    if not model.records[-1].adapter:
        return "full"
    if model.quantization and (merge or len(model.records) > 1):
        raise ExportError(
            f"{model.describe()} trained LoRA on the base loaded in 4 bits (QLoRA, model.quantization): the model the "
            "run evaluated is that 4-bit base with the adapters merged into it (with rounding), which export does not "
            "write yet. A pipeline of one QLoRA stage exports as its adapter (without --merge)")
    if merge:
        return "merged"
    stages = " -> ".join(f"{r.stage} ({'LoRA' if r.adapter else 'full'})" for r in model.records)
    if len(model.records) > 1:
        below = ("stacks LoRA adapters" if all(r.adapter for r in model.records[:-1])
                 else "puts a LoRA adapter on top of a full fine-tune")
        raise ExportError(f"{model.describe()} {below} ({stages}): its last adapter alone is not the model, and "
                          "peft loads one adapter per base. Add --merge to export the merged full weights")
    if is_builtin(model.base.name):
        raise ExportError(f"{model.describe()} is a LoRA adapter on {model.base.name}, a model that exists only "
                          "inside posttrain: a plain transformers user cannot load the base it needs. Add --merge to "
                          "export the merged full weights")
    return "adapter"


def check_out_place(model: PipelineModel, out_dir: Path) -> None:
    """--out outside the stage cache (whose folders are its entries: `cache gc` or `cache
    verify --fix` may delete anything else there, and the export's point is to outlive the
    cache) and outside the run directory (posttrain's records, which a re-run rewrites)."""
    out = Path(out_dir).resolve()
    caches = [model_dir.resolve().parents[2] for model_dir in model.model_dirs]   # <cache>/stages/<key>/model
    places = [(root, "the stage cache") for root in dict.fromkeys(caches)] + [(model.run.root.resolve(),
                                                                               "the run directory")]
    for root, what in places:
        if out == root or root in out.parents:
            raise ExportError(f"--out {out_dir}: is inside {what} ({root}); the export is a copy that must outlive "
                              "it: choose a folder elsewhere")


def prepare_out(out_dir: Path) -> Area:
    """--out must be missing or empty (a leftover scratch folder of an interrupted export is
    replaced); posttrain never writes into, or deletes, a folder of the user's."""
    out = Path(out_dir)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"--out {out_dir}: exists and is not a directory")
    area = Area(out)
    if out.is_dir():
        others = [p.name for p in out.iterdir() if p.name != SCRATCH]
        if others:
            raise ExportError(f"--out {out_dir}: is not empty ({len(others)} entries, e.g. {sorted(others)[0]}); "
                              "posttrain never writes into or deletes a folder of yours: choose a new or empty "
                              "directory (remove an earlier export yourself to export there again)")
        area.rmtree(out / SCRATCH)
    return area


def export_pipeline(model: PipelineModel, out_dir: Path, merge: bool,
                    log: Callable[[str], None] = lambda line: None) -> dict:
    """Write the pipeline's model into `out_dir` (new or empty); the export record."""
    kind = export_kind(model, merge)
    if all(r.adapter for r in model.records) and (model.weights or "").startswith("sha256:"):
        check_local_base(model)   # the base's weights are part of the model
    check_out_place(model, out_dir)
    area = prepare_out(out_dir)
    scratch = area.mkdir(area.path(SCRATCH))
    try:
        if kind == "adapter":
            tokenizer = write_adapter(model, area, scratch, log)
        else:
            tokenizer = write_weights(model, scratch, log)
        record = export_record(model, kind, tokenizer)
        area.write_text(scratch / "README.md", model_card(model, record))
        area.write_json(scratch / EXPORT_RECORD, record)
        names = sorted((p.name for p in scratch.iterdir()), key=lambda n: (n == EXPORT_RECORD, n))
        for name in names:   # the record last: its presence says the export is complete
            area.replace(scratch / name, area.path(name))
    finally:
        area.rmtree(scratch)   # empty when all went well; a failed attempt's files otherwise
    return record


def write_weights(model: PipelineModel, scratch: Path, log) -> object:
    """Load the pipeline's model through `models.load_model` (template and rows, then the
    adapters merged: the evaluated model) and save it whole; the tokenizer."""
    from posttrain.models import load_model

    source = model.source
    log(f"loading {source.name}" + (f" and merging {len(source.adapter_dirs)} LoRA adapter(s)"
                                    if source.adapter_dirs else ""))
    loaded = load_model(source)
    loaded.model.save_pretrained(str(scratch))
    loaded.tokenizer.save_pretrained(str(scratch))
    return loaded.tokenizer


def write_adapter(model: PipelineModel, area: Area, scratch: Path, log) -> object:
    """The adapter (its added tokens' rows inside), its config naming the base and its
    commit, the base's chat tokenizer and generation config with the template's EOS."""
    from posttrain.models import chat_tokenizer

    (record,), (model_dir,) = model.records, model.model_dirs
    for name in ADAPTER_FILES:
        if not (model_dir / name).is_file():
            raise ExportError(f"{model_dir / name}: missing from stage {record.stage}'s adapter; run the recipe "
                              "again to retrain it")
    area.copyfile(model_dir / "adapter_model.safetensors", scratch / "adapter_model.safetensors")
    config = json.loads((model_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_reference(model.base)
    config["revision"] = model.base.revision   # peft loads the base at it (AutoPeftModelForCausalLM)
    area.write_json(scratch / "adapter_config.json", config)
    log(f"writing the adapter of {record.stage} for {config['base_model_name_or_path']}")
    tokenizer = chat_tokenizer(model.base)
    tokenizer.save_pretrained(str(scratch))
    generation_config(model.base, tokenizer).save_pretrained(str(scratch))
    return tokenizer


def base_reference(base: ModelSource) -> str:
    """The base as a plain user names it: the hub id, or a local folder's absolute path."""
    path = Path(base.name).expanduser()
    return str(path.resolve()) if path.is_dir() else base.name


def check_local_base(model: PipelineModel) -> None:
    """A local base folder must still hold the weights the adapter trained on."""
    from posttrain.identity import weights_identity

    path = Path(model.base.name).expanduser()
    if not path.is_dir():
        raise ModelError(f"base model folder {model.base.name}: not found (a relative path is taken from the cwd); "
                         "the adapter needs it. Run export from where the run started, or add --merge")
    if weights_identity(model.base.name, model.base.revision) != model.weights:
        raise ModelError(f"base model folder {path}: its files changed since the adapter was trained on them; "
                         "the adapter would load on other weights. Run the recipe again to retrain it")


def generation_config(base: ModelSource, tokenizer):
    """The base's generation config (or one from its config) with the template's EOS and pad."""
    from transformers import GenerationConfig

    from posttrain.models import model_config

    try:
        config = GenerationConfig.from_pretrained(base.name, revision=base.revision)
    except (OSError, ValueError):
        config = GenerationConfig.from_model_config(model_config(base))
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


# ---------------------------------------------------------------- record and model card


def export_record(model: PipelineModel, kind: str, tokenizer) -> dict:
    """posttrain_export.json: what was exported; deterministic (no time, no cache path)."""
    from posttrain import __version__
    from posttrain.artifacts import MARKER

    first = model.records[0].key_inputs or {}
    template = read_plan_template(model.run)
    marker = json.loads((model.run.root / MARKER).read_text()) if (model.run.root / MARKER).is_file() else {}
    choice = model.base.chat_template
    return {
        "format": EXPORT_FORMAT,
        "posttrain": __version__,
        "recipe": marker.get("recipe") or model.recipe.get("name"),
        "run": model.run.root.name,
        "pipeline": model.pipeline,
        "seed": model.seed,
        "export": kind,
        "base_model": {"name": base_reference(model.base), "revision": model.base.revision,
                       "weights": model.weights, "dtype": model.base.dtype, "quantization": model.quantization},
        "chat_template": {"choice": choice if choice in ("chatml", "model") else "jinja",
                          "identity": first.get("template"), "eos_token": tokenizer.eos_token,
                          "pad_token": tokenizer.pad_token, "added_tokens": template.get("added_tokens") or []},
        "stages": [{"stage": r.stage, "method": r.method, "key": r.key, "adapter": r.adapter,
                    "data": {k: r.data.get(k) for k in ("name", "format", "examples", "fingerprint")},
                    "optimizer_steps": r.cost.optimizer_steps, "train_tokens": r.cost.train_tokens}
                   for r in model.records],
    }


def read_plan_template(run: RunDir) -> dict:
    try:
        template = json.loads(run.plan.read_text()).get("template")
    except (OSError, ValueError, AttributeError):
        return {}
    return template if isinstance(template, dict) else {}


# The settings the model card shows per stage, when the stage has them.
CARD_SETTINGS = ("learning_rate", "epochs", "max_steps", "batch_size", "max_length", "beta")


def model_card(model: PipelineModel, record: dict) -> str:
    """README.md: what the model is, how it was made, what it scored in the run."""
    base = record["base_model"]
    methods = sorted({r.method for r in model.records if r.method})
    front = ["---", f"library_name: {'peft' if record['export'] == 'adapter' else 'transformers'}"]
    if base["weights"] and base["weights"].startswith("commit:"):
        front.append(f"base_model: {base['name']}")
    front += ["tags:", *(f"- {tag}" for tag in ["posttrain", "trl", *methods]), "---", ""]
    pinned = f" at commit `{base['revision']}`" if base["revision"] else ""
    template = record["chat_template"]
    lines = [f"# {record['recipe']}: {model.pipeline} (seed {model.seed})", "",
             f"Exported by posttrain {record['posttrain']} from run `{record['run']}`, pipeline `{model.pipeline}` "
             f"(seed {model.seed}), as {KIND_WORDS[record['export']]}.", "",
             f"- Base model: `{base['name']}`{pinned} ({base['dtype']})" + quantized_note(base["quantization"]),
             f"- Chat template: {template['choice']}, EOS `{template['eos_token']}`"
             + (f"; tokens added to the base tokenizer: {', '.join(f'`{t}`' for t in template['added_tokens'])}"
                if template["added_tokens"] else ""), "",
             "## Stages", "", "| # | stage | method | weights | data | rows | steps | train tokens | settings |",
             "|---|---|---|---|---|---|---|---|---|"]
    for index, stage in enumerate(model.records, 1):
        settings = ", ".join(f"{k} {stage.settings[k]}" for k in CARD_SETTINGS if stage.settings.get(k) is not None)
        lines.append(f"| {index} | {stage.stage} | {stage.method} | {'LoRA' if stage.adapter else 'full'} | "
                     f"{dataset_label(model.recipe, stage.data.get('name'))} | {stage.cost.rows_trained or ''} | "
                     f"{stage.cost.optimizer_steps:,} | {stage.cost.train_tokens:,} | {settings} |")
    return "\n".join(front + lines + ["", *results_section(model), *usage_section(record["export"])]) + "\n"


def quantized_note(quantization: dict | None) -> str:
    if not quantization:
        return ""
    words = ", ".join(f"{k} {v}" for k, v in sorted(quantization.items()))
    return (f"; the adapter trained on it loaded in 4 bits by bitsandbytes ({words}): load the base with that "
            "`BitsAndBytesConfig` to get the model the run evaluated")


KIND_WORDS = {"full": "full weights (the pipeline ends in a full fine-tune)",
              "merged": "full weights with every LoRA adapter merged",
              "adapter": "a LoRA adapter on the base model"}


def dataset_label(recipe: dict, name) -> str:
    """A dataset by its recipe name and source (a local file by its name only)."""
    spec = (recipe.get("data") or {}).get(name) if isinstance(name, str) else None
    source = spec.get("source") if isinstance(spec, dict) else None
    if not isinstance(source, str):
        return f"`{name}`" + (" (a mix)" if isinstance(spec, dict) and spec.get("mix") else "")
    if source.startswith(("/", "~", "./", "../")):
        source = Path(source).name
    return f"`{name}` ({source})"


def results_section(model: PipelineModel) -> list[str]:
    """The run's evaluation rows for this pipeline and seed (results.jsonl)."""
    from posttrain.records import read_results

    rows = read_results(model.run.results) if model.run.results.is_file() else []
    rows = sorted((r for r in rows if r.pipeline == model.pipeline and r.seed == model.seed),
                  key=lambda r: (r.task, r.metric))
    if not rows:
        return ["## Evaluation", "", "The run holds no evaluation results for this pipeline and seed.", ""]
    lines = ["## Evaluation", "", "From the run's `results.jsonl` (this pipeline and seed):", "",
             "| task | metric | value | stderr |", "|---|---|---|---|"]
    for row in rows:
        value = "" if row.value is None else f"{row.value:.4g}"
        stderr = "" if not isinstance(row.stderr, (int, float)) else f"{row.stderr:.4g}"
        lines.append(f"| {row.task} | {row.metric} | {value} | {stderr} |")
    return lines + [""]


def usage_section(kind: str) -> list[str]:
    if kind == "adapter":
        load = ["from peft import AutoPeftModelForCausalLM",
                "from transformers import AutoTokenizer, GenerationConfig", "",
                "model = AutoPeftModelForCausalLM.from_pretrained(path)  # the base at its commit, then the adapter\n"
                "model.generation_config = GenerationConfig.from_pretrained(path)  # the template's EOS"]
    else:
        load = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                "model = AutoModelForCausalLM.from_pretrained(path)"]
    return ["## Use", "", "```python", *load[:-1], 'path = "this folder, or its hub repo id"', load[-1],
            "tokenizer = AutoTokenizer.from_pretrained(path)",
            'messages = [{"role": "user", "content": "Hello!"}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
            "return_dict=True)",
            "reply = model.generate(**inputs, max_new_tokens=64)",
            "print(tokenizer.decode(reply[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))", "```", ""]


# ---------------------------------------------------------------- the Hub


def check_repo_id(repo_id: str) -> None:
    """Refuse a malformed repo id before any work (the Hub would, after the export)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ExportError(f"--push-to-hub {repo_id!r}: not a valid repository id ({exc})") from None


def push_to_hub(folder: Path, repo_id: str, private: bool) -> str:
    """Create the model repository (kept if it exists) and upload the folder; its URL."""
    import huggingface_hub

    try:
        api = huggingface_hub.HfApi()
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload model exported by posttrain")
    except Exception as exc:  # auth, permissions, network, offline mode: the Hub's message, said as ours
        raise ExportError(f"--push-to-hub {repo_id}: the Hub refused: {type(exc).__name__}: {str(exc).rstrip('. ')}. The export is "
                          f"complete in {folder}; log in (`hf auth login`) or fix the repository, then upload it "
                          f"with `hf upload {repo_id} {folder}`") from None
    return str(url)
