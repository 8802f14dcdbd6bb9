"""Recipe checks a field type cannot make: names that must exist, data that fits its
stages, path-safe and case-distinct names, compute matching's reference.

They run on the raw mapping, beside pydantic, so every problem is reported at once.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

from posttrain.recipe.schema import BASE_PIPELINE, DATA_FORMATS, Recipe
from posttrain.recipe.sweep import SweepPlan, plan_sweep
from posttrain.stages import METHODS


def cross_problems(raw: dict):
    """Cross-references a field type cannot check: names that must exist, data that fits.

    Runs on the raw mapping, beside pydantic, so these are reported together with
    field errors rather than only after every field is valid. Yields
    `(place as a key tuple, message)`; the sweep is checked here too (`plan_sweep`).
    """
    def mapping(key):
        value = raw.get(key)
        return value if isinstance(value, dict) else {}

    data, stages, pipelines = mapping("data"), mapping("stages"), mapping("pipelines")
    yield from _name_problems(raw)
    yield from _quantized_full_finetuning(mapping("model"), stages)
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
        method = METHODS.get(stage.get("method")) if isinstance(stage, dict) else None
        for key in ("data", "eval_data"):
            spec = data.get(stage.get(key)) if method and isinstance(stage.get(key), str) else None
            problem = data_kind_problem(method.data, spec, stage[key]) if isinstance(spec, dict) else None
            if problem:
                yield ("stages", name, key), f"{method.name} {problem}"
        ref = stage.get("eval_data") if isinstance(stage, dict) else None
        if isinstance(ref, str) and data and ref not in data:
            yield ("stages", name, "eval_data"), f"unknown dataset {ref!r} (known: {_listed(data)})"
    plan, problems = plan_sweep(raw, cross_problems)
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
        single = [name for name, method in METHODS.items() if method.single_step]
        named = single[0] if len(single) == 1 else ", ".join(single[:-1]) + f" or {single[-1]}"
        yield ("compare",), f"no single-step pipeline (a pipeline of one {named} stage) to match"


def _match_plan(chains: dict[str, list[str]], method_of: Callable[[str], Any],
                reference: str | None) -> tuple[str | None, list[str]]:
    if reference is None:
        longest = max((len(chain) for chain in chains.values()), default=0)
        reference = next((name for name, chain in chains.items() if longest and len(chain) == longest), None)
    matched = [name for name, chain in chains.items() if name != reference and len(chain) == 1
               and getattr(METHODS.get(method_of(chain[0])), "single_step", False)]
    return reference, matched


def matched_pipelines(recipe: "Recipe") -> tuple[str, list[str]]:
    """Which pipelines `compare: {match: tokens}` matches, and to which reference.

    Returns `(reference, matched)`: the reference pipeline (`compare.reference`, else
    the first pipeline with the most stages) and, in recipe order, every other
    pipeline that is one stage of a single-step method (`Method.single_step`: ORPO,
    CPO, SimPO); the engine sets each matched pipeline's
    step count so that its train tokens equal the reference's. Pure: reads the
    (expanded) recipe only. Raises ValueError when no pipeline has a stage.
    """
    reference = recipe.compare.reference if recipe.compare else None
    reference, matched = _match_plan({name: list(chain) for name, chain in recipe.pipelines.items()},
                                     lambda stage: recipe.stages[stage].method, reference)
    if reference is None:
        raise ValueError("no pipeline has a stage to use as the reference")
    return reference, matched



def data_kind_problem(wanted: str, spec: dict, name: str) -> str | None:
    """Why dataset `name` cannot feed a stage that trains on `wanted` data, when its kind is
    known before loading (a builtin dataset, or a declared format); None when it can."""
    from posttrain.data.builtin import BUILTIN_FORMATS
    from posttrain.data.formats import FORMATS, KIND_NEEDS, can_feed

    source = spec.get("source")
    if isinstance(source, str) and source.startswith("builtin:") and source[8:] in BUILTIN_FORMATS:
        kind = FORMATS[BUILTIN_FORMATS[source[8:]]]
    else:
        kind = FORMATS.get(spec.get("format", "auto"))
    if kind is None or can_feed(kind, wanted):
        return None
    return f"needs {KIND_NEEDS[wanted]}; {name!r} is {kind} data"


def _quantized_full_finetuning(model: dict, stages: dict):
    """A 4-bit model trains only through LoRA (its weights cannot take gradient updates)."""
    if not model.get("quantization"):
        return
    for name, stage in stages.items():
        lora = stage.get("lora") if isinstance(stage, dict) else None
        if lora is False or (lora is None and not model.get("lora")):
            where = ("stages", name, "lora") if lora is False else ("stages", name)
            yield where, ("model.quantization (QLoRA) loads 4-bit weights, which train only through LoRA: "
                          "give model.lora (or this stage's lora), or remove model.quantization")
