"""`posttrain data inspect|curate`: the logic behind the CLI's data commands."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

from posttrain.errors import PosttrainError

RECIPE_SUFFIXES = (".yaml", ".yml")


def pick_dataset(recipe, dataset: str | None) -> str:
    if dataset is None:
        if len(recipe.data) != 1:
            raise PosttrainError(f"the recipe has several datasets; choose one with --dataset "
                                 f"({', '.join(recipe.data)})")
        return next(iter(recipe.data))
    if dataset not in recipe.data:
        raise PosttrainError(f"unknown dataset {dataset!r} (known: {', '.join(recipe.data)})")
    return dataset


def dataset_kind(recipe, name: str) -> str:
    """What the recipe's stages need from dataset `name`: the richest kind any stage reads
    (preference pairs, else labelled completions, else conversations)."""
    from posttrain.stages import METHODS

    wants = {METHODS[s.method].data for s in recipe.stages.values() if s.data == name}
    return next((kind for kind in ("preference", "unpaired") if kind in wants), "instruction")


def inspect_target(target: Path, dataset: str | None, fmt: str, samples: int, progress: bool,
                   split: str = "train", subset: str | None = None) -> str:
    """Inspect a data file or a folder in the hub layout (its `split`, `subset`), or a recipe's
    dataset (its file, or its generated/mixed rows); a recipe's dataset is measured in tokens
    of the recipe's tokenizer, and read up to its `limit` as a run reads it."""
    from posttrain.data.inspect import format_inspection, inspect_source

    if target.is_dir() or target.suffix not in RECIPE_SUFFIXES:
        return format_inspection(inspect_source(target, fmt, samples=samples, progress=progress, split=split,
                                                subset=subset))
    from posttrain.recipe.load import load_recipe
    from posttrain.data.sources import DataEnv, load_raw

    recipe = load_recipe(target)
    name = pick_dataset(recipe, dataset)
    spec = recipe.data[name]
    count, unit = recipe_token_counter(recipe)
    if spec.source and not spec.source.startswith("builtin:") and (target.parent / spec.source).is_file():
        return format_inspection(inspect_source(target.parent / spec.source, spec.format, samples=samples,
                                                progress=progress, count_tokens=count, unit=unit, limit=spec.limit))
    env = DataEnv(base_dir=target.parent, datasets=dict(recipe.data))
    examples, _, _ = load_raw(name, spec, dataset_kind(recipe, name), env)
    with tempfile.TemporaryDirectory() as tmp:
        from posttrain.artifacts import Area

        scratch = Area(Path(tmp))
        path = scratch.write_text(scratch.path("rows.jsonl"),   # not the recipe's name: any name is safe
                                  "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
        stats = inspect_source(path, "auto", samples=samples, progress=progress, count_tokens=count, unit=unit)
    # The rows were generated or mixed into a scratch file: name what the user asked for.
    return format_inspection({**stats, "path": f"{target}: data.{name} ({spec.source or 'mix'})"})


def recipe_token_counter(recipe) -> tuple[Callable[[str], int], str]:
    """Token count of a plain text under the recipe's chat tokenizer (the one its stages
    train with; no special tokens added, as curation's token limits count), and its label."""
    from posttrain.models import ModelSource, chat_tokenizer

    tokenizer = chat_tokenizer(ModelSource.of(recipe.model))
    return (lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
            f"tokens (recipe tokenizer: {recipe.model.name})")


def curate_to_file(recipe_path: Path, dataset: str, out_file: Path, overrides: list[str],
                   log: Callable[[str], None]) -> str:
    """Curate one dataset of a recipe as `posttrain run` would; write rows and report.

    The rows written are the curated source rows (pairs stay pairs, as curation counts
    them), which every stage reading the dataset converts to what it trains on."""
    from posttrain.artifacts import RunDir, write_json_atomic, write_text_atomic
    from posttrain.recipe.load import load_recipe
    from posttrain.evaluation import prepare_eval
    from posttrain.plan import data_env

    recipe = load_recipe(recipe_path, overrides)
    name = pick_dataset(recipe, dataset)
    if recipe.data[name].curate is None:
        raise PosttrainError(f"data.{name} has no curate: block")
    with tempfile.TemporaryDirectory() as tmp:
        setup = prepare_eval(recipe, RunDir(Path(tmp)), recipe_path.resolve().parent)
        from posttrain.evaluate import task_texts

        texts = task_texts(setup.refs, setup.task_dir)
        env = data_env(recipe, recipe_path.resolve().parent, eval_texts=lambda: texts, log=log)
        from posttrain.data.sources import curated_source_rows

        rows, _, _, curation = curated_source_rows(name, recipe.data[name], dataset_kind(recipe, name), env)
    write_text_atomic(out_file, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in rows))
    report_file = out_file.with_suffix(".curation.json")
    write_json_atomic(report_file, curation)
    removed = ", ".join(f"{reason} {count}" for reason, count in curation["removed"].items() if count)
    return (f"{name}: {curation['rows_in']} -> {curation['rows_out']} rows ({removed or 'nothing removed'})"
            f"\nwrote {out_file} and {report_file}")
