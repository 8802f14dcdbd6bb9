"""Loading a recipe: read the YAML strictly, apply `-o` overrides, validate, and
report every problem at once with its path and line."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationError

from posttrain.errors import PosttrainError, RecipeError
from posttrain.recipe.fields import error_message
from posttrain.recipe.references import PATH_NAME_SECTIONS, cross_problems
from posttrain.recipe.schema import Recipe
from posttrain.recipe.suggest import unknown_key_message
from posttrain.recipe.sweep import expand_sweep, plan_sweep, sweep_lines
from posttrain.recipe.yamlfile import YAML_MAX_BYTES, problems_error, strict_yaml_load
from posttrain.stages import METHODS, method_names


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
    recipe = validate_recipe(raw, path.name, lines)
    recipe.model._base_dir = path.resolve().parent   # a template file is named relative to the recipe
    return recipe


def validate_recipe(raw: dict, where: str, lines: dict[tuple, int] | None = None) -> Recipe:
    """Validate a raw recipe mapping; raise RecipeError listing every problem.

    A `sweep:` is checked with everything else, then expanded (`expand_sweep`): the
    Recipe returned holds the variant stages and pipelines, and `sweep` is `{}`.
    """
    lines = sweep_lines(lines or {})
    problems: list[tuple[tuple, str]] = []
    unswept = {key: value for key, value in raw.items() if key != "sweep"}
    try:
        Recipe.model_validate(unswept)
    except ValidationError as exc:
        problems += _pydantic_problems(exc, raw)
    problems += cross_problems(raw)
    if problems:
        raise problems_error(where, problems, lines)
    plan, _ = plan_sweep(raw, cross_problems)
    try:
        return Recipe.model_validate(expand_sweep(unswept, plan))
    except ValidationError as exc:  # not expected: every swept value was checked above
        raise problems_error(where, _pydantic_problems(exc, raw), lines) from None


def _pydantic_problems(exc: ValidationError, raw: dict) -> list[tuple[tuple, str]]:
    return [(_strip_union_tags(err["loc"]),
             f"missing 'method' ({method_names()})" if err["type"] == "union_tag_not_found"
             else unknown_key_message(raw, _strip_union_tags(err["loc"])) if err["type"] == "extra_forbidden"
             else error_message(err))
            for err in exc.errors()
            # a name that is not a string: _name_problems says so, with the naming rule
            if not (len(err["loc"]) == 3 and err["loc"][0] in PATH_NAME_SECTIONS and err["loc"][2] == "[key]")]


def _strip_union_tags(loc: tuple) -> tuple:
    # pydantic puts the discriminator value into the path (stages.dpo.dpo.beta); drop it.
    loc = tuple(loc)
    if len(loc) >= 3 and loc[0] == "stages" and loc[2] in METHODS:
        return loc[:2] + loc[3:]
    return loc






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

