"""Reading the records posttrain writes (results.jsonl, stage.json, pipelines.json, ...).

Records are read back by `posttrain report` long after they were written, possibly
from a run directory that was copied, truncated or edited. Every read goes through
these two functions, so a damaged file is a message naming the file and line, never
a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.errors import DataError

DAMAGED_HINT = "the file is damaged; re-run the recipe (finished stages and evaluations are reused) to rewrite it"


def read_json(path: Path, default=None, kind: type = dict):
    """A JSON file's content (of type `kind`), `default` when the file is absent."""
    path = Path(path)
    if not path.is_file():
        if default is not None:
            return default
        raise DataError(f"{path}: missing ({DAMAGED_HINT})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text ({DAMAGED_HINT})") from None
    except ValueError as exc:
        raise DataError(f"{path}:{getattr(exc, 'lineno', '?')}: not valid JSON ({DAMAGED_HINT})") from None
    if not isinstance(data, kind):
        raise DataError(f"{path}: expected a JSON {kind.__name__} ({DAMAGED_HINT})")
    return data


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """One JSON object per line; each must have the `required` keys."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text ({DAMAGED_HINT})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{number}: not valid JSON ({DAMAGED_HINT})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object ({DAMAGED_HINT})")
        missing = [key for key in required if key not in row]
        if missing:
            raise DataError(f"{path}:{number}: missing {', '.join(map(repr, missing))} ({DAMAGED_HINT})")
        rows.append(row)
    return rows
