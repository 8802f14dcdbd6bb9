"""'did you mean' for unknown recipe keys: close spellings of the keys allowed at that
place, and the names TRL, transformers and alignment-handbook configs use for them
(`num_train_epochs` -> `epochs`), so a pasted handbook config says where each key goes."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel

# A key as TRL / transformers / alignment-handbook / axolotl write it -> where it goes in a recipe.
# Relative names (no dot) are keys of the same mapping; dotted names are recipe paths.
FOREIGN_NAMES: dict[str, str] = {
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation",
    "lr_scheduler_type": "scheduler",
    "lr_scheduler": "scheduler",
    "max_seq_length": "max_length",
    "sequence_len": "max_length",
    "num_epochs": "epochs",
    "warmup_steps": "warmup_ratio (a fraction of the steps)",
    "model_name_or_path": "model.name",
    "base_model": "model.name",
    "model_revision": "model.revision",
    "torch_dtype": "model.dtype",
    "dtype": "model.dtype",
    "bf16": "model.dtype: bfloat16",
    "fp16": "model.dtype: float16",
    "use_peft": "model.lora (a mapping; omit it for full fine-tuning)",
    "adapter": "model.lora",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "output_dir": "output.dir",
    "dataset_mixer": "data (named datasets; a stage's data: names one)",
    "dataset_mixture": "data (named datasets; a stage's data: names one)",
    "dataset_name": "data.<name>.source",
    "datasets": "data",
    "dataset_splits": "data.<name>.split",
    "dataset_train_split": "data.<name>.split",
    "trust_remote_code": "model.trust_remote_code",
    "hub_model_revision": "model.revision",
    "report_to": "tracking",
    "do_eval": "eval",
    "eval_tasks": "eval.tasks",
    "dataset_config": "data.<name>.subset",
    "max_prompt_length": "max_length (TRL 1.16's DPO and ORPO have no max_prompt_length; max_length cuts "
                         "prompt and reply together)",
    "max_completion_length": "max_length (TRL 1.16 reads max_completion_length for encoder-decoder models only)",
    "eval_strategy": "eval_data and eval_steps",
    "per_device_eval_batch_size": "batch_size (held-out batches are training-sized)",
}


def unknown_key_message(raw: dict, loc: tuple) -> str:
    """'unknown key' for the key at `loc`, with where it probably belongs."""
    key = loc[-1] if loc else None
    if not isinstance(key, str):
        return "unknown key"
    allowed = allowed_keys(raw, loc[:-1])
    hints = [_relative(FOREIGN_NAMES[key], loc[:-1])] if key in FOREIGN_NAMES else []
    close = difflib.get_close_matches(key, sorted(allowed or ()), n=2, cutoff=0.7)
    hints += [name for name in close if name not in hints]
    return "unknown key" + (f"; did you mean {' or '.join(repr(h) if ' ' not in h else h for h in hints)}?"
                            if hints else "")


def _relative(target: str, parent: tuple) -> str:
    """`lora.alpha` seen from inside `model.lora` is `alpha`."""
    path, _, rest = target.partition(" ")
    parts = path.split(".")
    if len(parts) > 1 and tuple(parent[-(len(parts) - 1):]) == tuple(parts[:-1]):
        return " ".join([parts[-1]] + ([rest] if rest else []))
    return target


def allowed_keys(raw: Any, loc: tuple) -> set[str] | None:
    """The keys the recipe schema allows in the mapping at `loc` (None: not a model)."""
    from posttrain.recipe.schema import Recipe
    from posttrain.stages import METHODS

    annotation: Any = Recipe
    node = raw
    for part in loc:
        node = node.get(part) if isinstance(node, dict) else None
        model = _model_of(annotation)
        if model is not None:
            field = model.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            annotation = field.annotation
            if model is Recipe and part == "stages":
                annotation = dict[str, Any]
        else:
            annotation = _item_of(annotation)
        if annotation is Any and isinstance(node, dict) and node.get("method") in METHODS:
            annotation = METHODS[node["method"]].settings
    model = _model_of(annotation)
    return set(model.model_fields) if model is not None else None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model in an annotation (X, X | None, X | Literal[False])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for m in map(_model_of, typing.get_args(annotation)) if m is not None]
        return models[0] if len(models) == 1 else None
    return None


def _item_of(annotation: Any) -> Any:
    """dict[str, X] -> X; list[X] -> X; anything else -> Any."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if typing.get_origin(arg) in (dict, list):
                return _item_of(arg)
        return Any
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is dict and len(args) == 2:
        return args[1]
    if typing.get_origin(annotation) is list and args:
        return args[0]
    return Any
