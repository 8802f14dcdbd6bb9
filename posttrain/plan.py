"""The plan: a recipe's stage graph and its keys, the data each stage reads, estimates
and compute matching, and the plan as text. Trains and evaluates nothing.

Pipelines are chains of stages; a stage is identified by a hash of everything that
determines its output (upstream key, its settings, its data fingerprint, the base
model, the seed, library versions). Pipelines sharing a prefix share its stages:
`sft` and `sft+dpo` train SFT once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from posttrain.artifacts import RunDir, content_hash, library_versions
from posttrain.cache import Cache, checkpoint_step
from posttrain.data.sources import DataEnv, LoadedData, load_data
from posttrain.errors import DataError
from posttrain.models import ModelSource
from posttrain.recipe.schema import Recipe, pipelines_with_base, resolve_lora
from posttrain.stages import METHODS


@dataclass
class StageNode:
    """One stage to train for one seed, after `parent` (None: from the base model)."""

    stage: str
    seed: int
    key: str
    parent: "StageNode | None"
    data: LoadedData = field(repr=False)
    inputs: dict = field(default_factory=dict, repr=False)   # what the key hashes (stage_key_inputs)
    eval_data: LoadedData | None = field(default=None, repr=False)   # held-out rows (the stage's eval_data)

    @property
    def chain(self) -> list[str]:
        return (self.parent.chain if self.parent else []) + [self.stage]


@dataclass
class Plan:
    recipe: Recipe
    nodes: dict[str, StageNode]                  # key -> node, in training order
    finals: dict[tuple[str, int], StageNode | None]  # (pipeline, seed) -> last node (None: base)
    data: dict[str, LoadedData]
    weights: str | None = None                   # identity.weights_identity of the base model
    template: str | None = None                  # template_identity: the chat template's text, hashed
    precision: str | None = None                 # model.dtype resolved on the device (models.resolve_precision)
    world_size: int = 1                          # the processes each stage trains on (posttrain.distributed)
    device: str | None = None                    # "cuda"/"cpu" planned for (None: this machine's)
    gpu_memory_gb: float | None = None           # one GPU's memory planned for (None: this machine's)
    sizes: dict = field(default_factory=dict, repr=False)   # LoRA spec -> ModelSize (model_size_for)
    facts: object = field(default=None, repr=False)         # defaults.Machine (machine_facts)
    config_strategy: str | None = None           # the strategy of the recipe's distributed.accelerate_config

    @property
    def base_key(self) -> str:
        return base_key(self.recipe, self.weights, self.template, self.precision)


def base_source(recipe: Recipe) -> ModelSource:
    return ModelSource.of(recipe.model)


def base_key(recipe: Recipe, weights: str | None = None, template: str | None = None,
             precision: str | None = None) -> str:
    """Identity of the untrained model: its spec (name, revision, template, dtype), what
    its weights are (`identity.weights_identity`: a hub commit or a local folder's digest;
    none for builtin models), the text of the chat template it is used with and the
    precision `dtype: auto` resolved to (`key_precision`)."""
    return content_hash({"base_model": recipe.model.model_dump(mode="json", exclude={"lora"}),
                         **({"weights": weights} if weights else {}),
                         **({"template": template} if template else {}),
                         **key_precision(recipe, precision)})


def key_precision(recipe: Recipe, precision: str | None) -> dict:
    """What a key adds for the precision: with `model.dtype: auto`, the dtype it resolved
    to on the device (a CPU float32 stage and a GPU bf16 one differ); with an explicit
    dtype nothing (the dtype, hashed as written, is the precision: cached keys stay)."""
    return {"precision": precision} if precision and recipe.model.dtype == "auto" else {}


def template_identity(recipe: Recipe) -> str:
    """The chat template a recipe's stages train with, as a digest of its text: ChatML's,
    the model's own (read from its tokenizer: an edited template is a new identity), or
    the recipe's Jinja (a file's content, not its name)."""
    import hashlib

    from posttrain.models import CHATML_TEMPLATE, load_tokenizer

    choice = recipe.model.template_choice()
    if choice == "chatml":
        text = CHATML_TEMPLATE
    elif choice == "model":
        text = load_tokenizer(base_source(recipe)).chat_template or ""
    else:
        text = choice
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_key_inputs(recipe: Recipe, stage_name: str, seed: int, parent_key: str | None,
                     data: LoadedData, weights: str | None = None, template: str | None = None,
                     precision: str | None = None) -> dict:
    """Everything a stage's key hashes; recorded in stage.json so `plan` can say what changed.
    Not the world size: the recipe's batch_size x gradient_accumulation is the global batch
    on any number of processes (posttrain.distributed)."""
    stage = recipe.stages[stage_name]
    lora = resolve_lora(recipe, stage)
    return {
        "parent": parent_key,
        "base_model": recipe.model.model_dump(mode="json", exclude={"lora"}),
        **({"weights": weights} if weights else {}),
        **({"template": template} if template else {}),
        **key_precision(recipe, precision),
        "stage": stage.key_settings(),
        "lora": lora.model_dump(mode="json") if lora else None,
        "data": data.fingerprint,
        "seed": stage.seed if stage.seed is not None else seed,
        "versions": {k: v for k, v in library_versions().items() if k not in ("lm_eval", "wandb")},
    }


# What each input of a stage key is called when `plan` says why a stage trains again.
KEY_INPUT_NAMES = {"parent": "upstream stage", "base_model": "base model", "weights": "base model's weights",
                   "template": "chat template", "precision": "resolved precision",
                   "stage": "settings", "lora": "LoRA", "data": "data fingerprint", "seed": "seed",
                   "versions": "library versions"}


def key_changes(before: dict, now: dict) -> list[str]:
    """Which inputs of a stage key differ between an earlier stage and now, readably."""
    changes = []
    for name, label in KEY_INPUT_NAMES.items():
        old, new = before.get(name), now.get(name)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            fields = [f"{k} {old.get(k, '-')} -> {new.get(k, '-')}" for k in sorted({*old, *new})
                      if old.get(k) != new.get(k)]
            changes.append(f"{label}: {', '.join(fields)}")
        elif name in ("parent", "data"):
            changes.append(f"{label} changed ({str(old)[:12]} -> {str(new)[:12]})")
        elif name in ("weights", "template"):   # "sha256:<hex>" / "commit:<40 hex>"
            changes.append(f"{label} changed ({str(old)[:19]} -> {str(new)[:19]})")
        else:
            changes.append(f"{label}: {old} -> {new}")
    return changes


def why_trains(cache: Cache, node: StageNode) -> str | None:
    """Why `node` trains although a stage of the same name and seed is in the cache:
    the inputs of its key that changed since the most recently used such stage."""
    from posttrain.artifacts import STAGE_RECORD
    from posttrain.cache import last_used, read_json

    folder = cache.root / "stages"
    candidates = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        info = read_json(entry / STAGE_RECORD) if not entry.name.startswith(".") else None
        if isinstance(info, dict) and info.get("stage") == node.stage and info.get("seed") == node.seed:
            candidates.append((info.get("chain") == node.chain, last_used(entry), info))
    if not candidates:
        return None
    _, _, info = max(candidates, key=lambda c: (c[0], c[1]))
    before = info.get("key_inputs")
    if not isinstance(before, dict):
        return f"differs from cached {str(info.get('key'))[:12]} (which predates recorded key inputs)"
    changes = key_changes(before, node.inputs)
    return "; ".join(changes) if changes else None


def data_key(stage) -> str:
    """Where a stage's data is in `load_stage_data`'s result: the dataset in its method's kind."""
    return f"{stage.data}:{METHODS[stage.method].data}"


def load_stage_data(recipe: Recipe, env: DataEnv) -> dict[str, LoadedData]:
    """Each dataset once, in the kind its stages need (preference data may feed SFT)."""
    loaded: dict[tuple[str, str], LoadedData] = {}
    problems = []
    for stage_name, stage in recipe.stages.items():
        want = METHODS[stage.method].data
        for name in filter(None, (stage.data, stage.eval_data)):
            if (name, want) not in loaded:
                loaded[(name, want)] = load_data(name, recipe.data[name], want, env)
        data = loaded[(stage.data, want)]
        if not data.examples:
            after = (f" after curation (it had {data.rows_before_curation:,} rows)"
                     if data.rows_before_curation else "")
            problems.append(f"data.{stage.data}: no rows{after}; stages.{stage_name} has nothing to train on")
    if problems:
        raise DataError("nothing to train on", problems)
    return {f"{name}:{want}": data for (name, want), data in loaded.items()}


def data_env(recipe: Recipe, base_dir: Path, cache_dir: Path | None = None, eval_texts=None,
             log: Callable[[str], None] = lambda line: None) -> DataEnv:
    """How datasets are loaded for this recipe: its tokenizer counts tokens, its model scores."""
    from functools import cache

    @cache
    def count_tokens():
        from posttrain.models import load_tokenizer

        tokenizer = load_tokenizer(base_source(recipe))
        return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def scorer(name: str | None):
        from posttrain.data.curate import Scorer

        source = base_source(recipe) if name is None else replace(base_source(recipe), name=name)
        return Scorer.from_source(source)

    return DataEnv(base_dir=base_dir, datasets=dict(recipe.data), count_tokens=count_tokens,
                   eval_texts=eval_texts, scorer=scorer, cache_dir=cache_dir, seed=recipe.seeds[0], log=log)


def make_plan(recipe: Recipe, env: DataEnv | Path, data: dict[str, LoadedData] | None = None,
              cache_root: Path | None = None, world_size: int | None = None, device: str | None = None,
              gpu_memory_gb: float | None = None) -> Plan:
    """The stage graph with every key. `cache_root`: where a local model folder's file
    hashes are remembered (None: hashed afresh). `world_size` and `device`: the machine
    planned for (None: this run's processes, this machine's device); the world size is
    in no key, the precision `device` resolves `dtype: auto` to is."""
    from posttrain.distributed import world_size as launched_world_size
    from posttrain.identity import weights_identity
    from posttrain.models import resolve_precision

    env = env if isinstance(env, DataEnv) else data_env(recipe, env)
    data = data if data is not None else load_stage_data(recipe, env)
    weights = weights_identity(recipe.model.name, recipe.model.revision, cache_root)
    template = template_identity(recipe)
    precision = resolve_precision(recipe.model.dtype, device).dtype
    nodes: dict[str, StageNode] = {}
    finals: dict[tuple[str, int], StageNode | None] = {}
    for pipeline, chain in pipelines_with_base(recipe).items():
        for seed in recipe.seeds:
            parent = None
            for stage_name in chain:
                stage = recipe.stages[stage_name]
                stage_data = data[data_key(stage)]
                held_out = data[f"{stage.eval_data}:{METHODS[stage.method].data}"] if stage.eval_data else None
                inputs = stage_key_inputs(recipe, stage_name, seed, parent.key if parent else None, stage_data,
                                          weights, template, precision)
                if held_out is not None:
                    inputs["eval_data"] = held_out.fingerprint
                key = content_hash(inputs)
                parent = nodes.setdefault(key, StageNode(stage_name, seed, key, parent, stage_data, inputs, held_out))
            finals[(pipeline, seed)] = parent
    return Plan(recipe, nodes, finals, data, weights, template, precision,
                launched_world_size() if world_size is None else world_size, device, gpu_memory_gb,
                config_strategy=recipe_config_strategy(recipe, env.base_dir))


def recipe_config_strategy(recipe: Recipe, base_dir: Path) -> str | None:
    """The strategy the recipe's own accelerate config names (what `run --gpus N` launches
    with, and `auto` follows), or None (none given; an unreadable one is refused by the checks)."""
    from posttrain.distributed import config_strategy, read_accelerate_config

    path = recipe.distributed.config_file(base_dir)
    if path is None:
        return None
    try:
        return config_strategy(read_accelerate_config(path))
    except ValueError:
        return None


def source_after(plan: Plan, node: StageNode | None, cache: Cache) -> ModelSource:
    """The model a pipeline has after `node`: full weights, or base + merged adapters. A hub
    model is loaded at the commit its key holds, not by a branch that may move meanwhile."""
    if node is None:
        base = base_source(plan.recipe)
        if plan.weights and plan.weights.startswith("commit:"):
            return replace(base, revision=plan.weights.removeprefix("commit:"))
        return base
    previous = source_after(plan, node.parent, cache)
    model_dir = str(cache.stage_dir(node.key) / "model")
    if cache.stage_record(node.key).adapter:
        return replace(previous, adapter_dirs=previous.adapter_dirs + (model_dir,))
    return replace(previous, name=model_dir, adapter_dirs=(), revision=None)


def stage_estimates(recipe: Recipe, data: dict[str, LoadedData], tokenizer=None) -> dict[str, dict]:
    """Per stage name: examples, rows dropped and cut, steps and train tokens before it runs
    (seed-independent). `tokenizer`: the recipe's chat tokenizer (`models.chat_tokenizer`),
    loaded when not given."""
    from posttrain.estimate import epoch_size, estimate_stage, measure, tokenization
    from posttrain.models import chat_tokenizer
    from posttrain.stages import METHODS

    tokenizer = tokenizer or chat_tokenizer(base_source(recipe))
    used = {name for chain in recipe.pipelines.values() for name in chain}
    measured: dict[str, list] = {}   # per dataset: DPO and ORPO on one dataset measure it once
    estimates = {}
    for name, spec in recipe.stages.items():
        if name in used:
            key, examples = data_key(spec), data[data_key(spec)].examples
            if key not in measured:
                measured[key] = measure(examples, tokenizer)
            epoch = epoch_size(measured[key], len(examples), spec.max_length,
                               tokenization(METHODS[spec.method], tokenizer))
            estimates[name] = estimate_stage(spec, epoch).as_dict()
    return estimates


def match_compute(recipe: Recipe, data: dict[str, LoadedData],
                  estimates: dict[str, dict]) -> tuple[Recipe, dict[str, dict], dict]:
    """compare.match: tokens — give single-step pipelines the reference pipeline's train tokens.

    Returns the recipe with the matched stages' max_steps set, the estimates updated for
    them (their per-epoch token counts are reused, not counted again), and the notes.
    """
    from posttrain.recipe.references import matched_pipelines
    from posttrain.estimate import StageEstimate, estimate_stage, match_steps

    reference, matched = matched_pipelines(recipe)
    target = sum(estimates[name]["tokens"] for name in recipe.pipelines[reference])
    stages, estimates = dict(recipe.stages), dict(estimates)
    notes = {}
    for pipeline in matched:
        (stage_name,) = recipe.pipelines[pipeline]
        before = StageEstimate(**estimates[stage_name])
        steps = match_steps(target, before)
        spec = stages[stage_name] = stages[stage_name].model_copy(update={"max_steps": steps})
        estimates[stage_name] = estimate_stage(spec, before.epoch).as_dict()
        notes[pipeline] = {"stage": stage_name, "max_steps": steps, "was_steps": before.steps,
                           "target_tokens": target}
    return (recipe.model_copy(update={"stages": stages}), estimates,
            {"match": "tokens", "reference": reference, "pipelines": notes})


def plan_rows(plan: Plan, cache: Cache, estimates: dict[str, dict]) -> list[dict]:
    """The stage graph in training order: what runs, what is reused, keys and sizes, and
    how each stage trains on the machine planned for (`resolved`)."""
    rows = []
    for node in plan.nodes.values():
        verdict = cache.verify("stages", node.key)  # a corrupt entry is retrained, never used
        corrupt = verdict.problems if verdict else []
        if verdict is not None and not corrupt:
            status = "reuse"
        elif corrupt:
            status = "train (corrupt)"
        else:
            checkpoint = cache.resume_checkpoint(node.key)
            status = f"resume@{checkpoint_step(checkpoint)}" if checkpoint else "train"
        spec = plan.recipe.stages[node.stage]
        rows.append({"status": status, "stage": node.stage, "method": spec.method, "seed": node.seed,
                     "key": node.key, "after": " -> ".join(node.chain[:-1]) or "base",
                     "why": ("the cached entry is corrupt: " + "; ".join(corrupt) if corrupt
                             else why_trains(cache, node) if status == "train" else None),
                     **estimates.get(node.stage, {}), **resolved(plan, node.stage)})
        rows[-1]["disk"] = countable(lambda: disk_estimate(plan, node.stage, rows[-1]))
    return rows


def countable(estimate):
    """`estimate`'s result, or None when the model cannot be built on the meta device to count
    its parameters (an architecture transformers cannot build from its config): the plan shows
    "?" rather than failing on an estimate."""
    from posttrain.errors import ModelError

    try:
        return estimate()
    except (ModelError, ValueError, OSError, ImportError, KeyError):
        return None


def resolved(plan: Plan, stage: str) -> dict:
    """How stage `stage` trains on the machine planned for: its global batch laid out on the
    world size (per-device batch, accumulation), the strategy, precision and the GPU
    defaults (`defaults.resolve_stage`). Recorded in stage.json too (`StageRecord.resolved`)."""
    from posttrain.defaults import resolve_stage
    from posttrain.distributed import stage_layout

    spec = plan.recipe.stages[stage]
    layout = stage_layout(stage, spec, plan.world_size)
    lora = resolve_lora(plan.recipe, spec)
    facts = machine_facts(plan)
    size = countable(lambda: model_size_for(plan, lora)) if facts.device == "cuda" else None
    settings = resolve_stage(spec, lora, plan.recipe.model, plan.recipe.distributed.strategy, layout, facts, size,
                             METHODS[spec.method].sequences, launched=plan.config_strategy)
    return {**layout.as_dict(), **settings}


def machine_facts(plan: Plan):
    """The facts of the machine planned for (defaults.Machine), read once per plan."""
    if plan.facts is None:
        from posttrain.defaults import machine

        plan.facts = machine(plan.device, plan.gpu_memory_gb)
    return plan.facts


def model_size_for(plan: Plan, lora):
    """The base model's size with `lora` (distributed.ModelSize), counted once per LoRA spec."""
    key = lora.model_dump_json() if lora is not None else None
    if key not in plan.sizes:
        from posttrain.models import model_size

        plan.sizes[key] = model_size(base_source(plan.recipe), lora)
    return plan.sizes[key]


# Bytes per parameter in a training checkpoint beside the weights: AdamW's two fp32 moments.
OPTIMIZER_BYTES = 8
# DeepSpeed also keeps fp32 master weights of 16-bit parameters in its optimizer state.
MASTER_BYTES = 4
ADAPTER_BYTES = 4   # peft keeps (and saves) LoRA adapters in float32


def disk_estimate(plan: Plan, stage: str, row: dict) -> dict:
    """The disk stage `stage` takes in the cache: its final model (full weights in the
    trained dtype, or the LoRA adapter) and, while it trains, up to
    `output.save_total_limit` checkpoints of weights + optimizer state (AdamW: 8 bytes a
    trainable parameter; + fp32 master weights under DeepSpeed), none when checkpoints are
    off. `peak` is both; a finished stage keeps only its model."""
    spec, output = plan.recipe.stages[stage], plan.recipe.output
    lora = resolve_lora(plan.recipe, spec)
    size = model_size_for(plan, lora)
    weight = {"float32": 4, "bfloat16": 2, "float16": 2}[row["precision"]]
    if lora is None:
        model = weight * size.params
        master = MASTER_BYTES * size.params if weight < 4 and row["strategy"] in ("zero2", "zero3") else 0
        checkpoint = model + OPTIMIZER_BYTES * size.params + master
    else:
        model = ADAPTER_BYTES * size.trainable
        checkpoint = model + OPTIMIZER_BYTES * size.trainable
    kept = 0
    if output.checkpoint_steps or output.checkpoint_minutes:
        kept = output.save_total_limit
        if output.checkpoint_steps and not output.checkpoint_minutes and row.get("steps"):
            kept = min(kept, row["steps"] // output.checkpoint_steps)
    return {"model_bytes": model, "checkpoint_bytes": checkpoint, "checkpoints": kept,
            "peak_bytes": model + kept * checkpoint}


def disk_total(rows: list[dict]) -> dict:
    """The cache's growth for the stages to train (not reused): every final model, plus the
    largest one stage's checkpoints (a finished stage deletes its own before the next)."""
    todo = [r for r in rows if r["status"] != "reuse" and r["disk"] is not None]
    models = sum(r["disk"]["model_bytes"] for r in todo)
    checkpoints = max((r["disk"]["peak_bytes"] - r["disk"]["model_bytes"] for r in todo), default=0)
    return {"models_bytes": models, "checkpoints_bytes": checkpoints, "total_bytes": models + checkpoints}


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def format_plan(plan: Plan, rows: list[dict], info: dict) -> str:
    """The plan as text: a table of stages, then pipelines and compute matching."""
    header = ["status", "stage", "seed", "key", "after", "examples", "cut", "steps", "~tokens",
              "batch", "device batch", "accum", "precision", "strategy", "disk"]
    table = [[r["status"], f"{r['stage']} ({r['method']})", str(r["seed"]), r["key"][:12], r["after"],
              f"{r.get('examples', 0):,}" + (f" ({r['dropped']:,} dropped)" if r.get("dropped") else ""),
              f"{r.get('truncated', 0):,}", f"{r.get('steps', 0):,}", f"{r.get('tokens', 0):,}",
              str(r["global_batch"]), str(r["per_device_batch"]), str(r["gradient_accumulation"]),
              r["precision"] + (" (bf16 mixed)" if r["bf16"] else ""), r["strategy"],
              gigabytes(r["disk"]["peak_bytes"]) if r["disk"] else "?"] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    for r in rows:
        if r.get("why"):
            lines.append(f"  why {r['stage']} (seed {r['seed']}) trains again: {r['why']}")
    if any(r.get("truncated") for r in rows):
        lines.append("  cut: rows kept with a sequence longer than max_length (tokens past it are not trained "
                     "and not counted)")
    todo = [r for r in rows if r["status"] != "reuse"]
    lines.append(f"\n{len(rows)} stage runs: {len(rows) - len(todo)} reused from the cache, {len(todo)} to train "
                 f"(~{sum(r.get('steps', 0) for r in todo):,} steps, ~{sum(r.get('tokens', 0) for r in todo):,} "
                 "tokens)")
    if any(r["disk"] for r in todo):
        disk = disk_total(rows)
        lines.append(f"disk: ~{gigabytes(disk['total_bytes'])} in the cache for the stages to train (their models "
                     f"{gigabytes(disk['models_bytes'])}, plus at most {gigabytes(disk['checkpoints_bytes'])} of one "
                     "stage's checkpoints at a time: a finished stage deletes its checkpoints)")
    if rows and rows[0]["device"] == "cuda":
        lines += [f"GPU defaults {r['stage']} (seed {r['seed']}): " + ", ".join(
            f"{k} {r[k]}" for k in ("attn_implementation", "gradient_checkpointing", "dataloader_pin_memory",
                                    "use_liger_kernel")) + f" (per-device memory estimate {r['memory_gb']} GB)"
            for r in rows if r["seed"] == rows[0]["seed"]]
    strategies = {(r["stage"], r["strategy"], r["strategy_why"]) for r in rows if r["strategy"] != "single"}
    for stage, strategy, why in sorted(strategies):
        lines.append(f"strategy {stage}: {strategy} ({why})")
    if rows:
        lines.append(f"world size {plan.world_size} ({rows[0]['device']}): batch = batch_size x gradient_accumulation"
                     f", the global batch = device batch x accum x {plan.world_size} (stage keys do not depend on "
                     "the world size)")
    evals = len({p for p, _ in plan.finals}) - 1
    lines.append(f"evaluations: base + {evals} pipeline(s) x {len(plan.recipe.seeds)} seed(s)"
                 + (f" + {len(plan.recipe.external)} external" if plan.recipe.external else ""))
    matching = info.get("compute_match")
    if matching:
        for pipeline, note in matching["pipelines"].items():
            lines.append(f"compute matching: {pipeline}: {note['stage']}.max_steps = {note['max_steps']} "
                         f"(was {note['was_steps']}) to match {matching['reference']}'s "
                         f"~{note['target_tokens']:,} train tokens")
    return "\n".join(lines)


def data_summary(plan: Plan) -> dict:
    """Per dataset used: rows, format, fingerprint, skipped rows, curation report."""
    return {key: {"name": d.name, "kind": d.kind, "format": d.format, "rows": len(d.examples),
                  "fingerprint": d.fingerprint, "skipped_rows": len(d.skipped), "skipped": d.skipped[:20],
                  "rows_before_curation": d.rows_before_curation, "curation": d.curation}
            for key, d in plan.data.items()}


def pipeline_stage_dirs(plan: Plan, run: RunDir) -> dict:
    """{pipeline: {seed: [stage dir names in order]}}: how the report sums cost."""
    out: dict[str, dict[str, list[str]]] = {}
    for (pipeline, seed), node in plan.finals.items():
        dirs = []
        while node is not None:
            dirs.insert(0, run.stage_dir(node.stage, node.seed, node.key).name)
            node = node.parent
        out.setdefault(pipeline, {})[str(seed)] = dirs
    return out
