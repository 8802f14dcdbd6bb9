"""A recipe's named datasets -> canonical examples, with a content fingerprint.

`builtin:` sources are generated in code (posttrain.data.builtin); everything else
goes through the file/hub loader in posttrain.data.io.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from posttrain.data.builtin import BUILTIN_DATASETS
from posttrain.data.formats import convert_row, kind_of, preference_to_instruction
from posttrain.data.io import load_examples
from posttrain.errors import DataError


@dataclass
class LoadedData:
    name: str
    examples: list[dict]
    format: str
    kind: str              # "instruction" | "preference"
    skipped: list[str]
    fingerprint: str       # sha256 of the canonical examples: what the stage keys hash


def fingerprint(examples: list[dict]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def load_builtin(source: str, fmt: str, split: str, limit: int | None) -> tuple[list[dict], str]:
    name = source.removeprefix("builtin:")
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown builtin dataset {source!r}; choose one of: "
                        + ", ".join(f"builtin:{n}" for n in BUILTIN_DATASETS))
    rows = BUILTIN_DATASETS[name](split=split)
    fmt = "messages" if name == "skills" else "preference" if fmt == "auto" else fmt
    examples = [convert_row(row, fmt) for row in rows]
    return (examples[:limit] if limit else examples), fmt


def load_data(name: str, spec, want: str, base_dir: Path | None) -> LoadedData:
    """Load dataset `name` of a recipe for a stage that needs `want` kind of data."""
    if spec.source.startswith("builtin:"):
        examples, fmt = load_builtin(spec.source, spec.format, spec.split, spec.limit)
        if want == "preference" and kind_of(fmt) == "instruction":
            raise DataError(f"data.{name}: preference stages need preference data, {spec.source} is instruction data")
        if want == "instruction" and kind_of(fmt) == "preference":
            examples = [preference_to_instruction(e) for e in examples]
        skipped: list[str] = []
    else:
        result = load_examples(spec.source, spec.format, split=spec.split, on_bad_rows=spec.on_bad_rows,
                               want=want, base_dir=base_dir, limit=spec.limit)
        examples, fmt, skipped = result.examples, result.format, result.skipped
    return LoadedData(name=name, examples=examples, format=fmt, kind=want, skipped=skipped,
                      fingerprint=fingerprint(examples))
