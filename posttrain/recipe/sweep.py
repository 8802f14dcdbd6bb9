"""A recipe's `sweep:`, a grid over stage settings: checked, then expanded into
variant stages and pipelines before the Recipe model is built."""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable

from pydantic import ValidationError

from posttrain.recipe.fields import error_message
from posttrain.stages import METHODS

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


def plan_sweep(raw: dict, cross_problems: Callable[[dict], Any] = lambda raw: ()
               ) -> tuple[SweepPlan, list[tuple[tuple, str]]]:
    """Check the raw recipe's `sweep:` and plan its expansion: (plan, problems).

    The plan covers the valid sweep keys even when there are problems, so that names
    elsewhere (report.baseline) are checked against the expanded pipelines.
    `cross_problems` (references.cross_problems) checks what a swept value names.
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

    models = {name: method.settings for name, method in METHODS.items()}

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
            value_problems, values[i] = _check_variant(model, stage, stage_name, field, value, data,
                                                        cross_problems)
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


def _check_variant(model: type, stage: dict, stage_name: str, field: str, value: Any, data: dict,
                   cross_problems: Callable[[dict], Any]):
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
                problems.append((loc[1:], error_message(err)))
    # Names a field type cannot check (a swept `data:` must be a fitting dataset).
    for loc, message in cross_problems({"data": data, "stages": {stage_name: variant}}):
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


def sweep_lines(lines: dict[tuple, int]) -> dict[tuple, int]:
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

