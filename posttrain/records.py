"""The records posttrain writes and reads back: typed, with one reader and one writer each.

- `StageRecord` (a stage's `stage.json`, in the cache and in the run directory) with
  its `Cost`;
- `ResultRow` (one line of `results.jsonl`, the one source of the report).

Records are read back by `posttrain report` long after they were written, possibly
from a run directory that was copied, truncated, edited, or written by an older
posttrain. Every read goes through `read_json` / `read_jsonl`, so a damaged file is a
message naming the file and line, never a traceback; fields added since a record was
written get their defaults.

Format versions: a stage record carries `"format": 2`; one without it is format 1
(written before the records were typed). Result rows carry no version (the rows of
`results.jsonl` stay as they were); the run directory's marker records the format of
the whole directory (`artifacts.RUN_FORMAT`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, ClassVar

from posttrain.errors import DataError

DAMAGED_HINT = "the file is damaged; re-run the recipe (finished stages and evaluations are reused) to rewrite it"
FORMAT = 2           # what this version writes; a record without "format" is format 1


class BadRecord(ValueError):
    """A record that parses as JSON but cannot be used; the message says why (the
    caller names the file)."""


# ---------------------------------------------------------------- files


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


def read_jsonl(path: Path, required: tuple[str, ...] = (), parse: Callable[[dict], object] | None = None) -> list:
    """One JSON object per line; each must have the `required` keys. `parse` turns each
    object into a record; its BadRecord becomes a DataError naming the file and line."""
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
        try:
            rows.append(parse(row) if parse else row)
        except BadRecord as exc:
            raise DataError(f"{path}:{number}: {exc} ({DAMAGED_HINT})") from None
    return rows


# ---------------------------------------------------------------- checking fields

NUMBER = (int, float)


def _wrong_types(data: dict, types: dict[str, tuple], prefix: str = "") -> list[str]:
    """The keys of `data` whose value is not of their type (bool is never a number);
    absent keys are not checked (they take their defaults)."""
    wrong = []
    for name, kinds in types.items():
        if name in data:
            value = data[name]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                wrong.append(repr(prefix + name))
    return wrong


def _check_format(data: dict) -> None:
    version = data.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BadRecord(f"format {version!r} is not a record format")
    if version > FORMAT:
        raise BadRecord(f"written by a newer posttrain (record format {version}; this version reads 1 to {FORMAT})")


# ---------------------------------------------------------------- stage record


def _reported(label: str, spec: str) -> dict:
    """Field metadata of a cost the report shows: its column label and number format."""
    return {"label": label, "format": spec}


# Cost's row counts: written only when known (an older record reads back unchanged).
ROW_COUNTS = ("rows_given", "rows_trained", "rows_truncated")
# Cost's throughput telemetry (posttrain.telemetry): written only when known; None in
# records written before it was measured (the report shows "n/a").
THROUGHPUT = ("tokens_real", "tokens_padded", "train_runtime_s", "tokens_per_s_real", "tokens_per_s_padded",
              "model_flops", "peak_flops_per_device", "mfu", "world_size", "device_name", "peak_memory_reserved_mb")


@dataclass(frozen=True)
class Cost:
    """What training a stage cost. Passes count sequences (a preference pair is two).

    The fields with a label are the report's cost columns, in this order: summed over a
    pipeline's stages (peak memory: the maximum) and averaged over seeds.
    """

    train_tokens: int = field(default=0, metadata=_reported("train tokens", ",.0f"))
    optimizer_steps: int = field(default=0, metadata=_reported("optimizer steps", ",.0f"))
    forward_passes: int = field(default=0, metadata=_reported("forward passes", ",.0f"))  # a reference's too
    backward_passes: int = field(default=0, metadata=_reported("backward passes", ",.0f"))
    wall_s: float = field(default=0.0, metadata=_reported("train time (s)", ".1f"))  # earlier attempts' too
    peak_memory_mb: float = field(default=0.0, metadata=_reported("peak memory (MB)", ".0f"))
    peak_memory_kind: str | None = None  # RSS on CPU, max allocated on GPU
    examples_seen: int = 0
    resumed_from_step: int | None = None
    # The rows the stage was given (its data, in its method's kind) and those its trainer
    # kept: TRL drops pairs whose prompt fills max_length, posttrain the pairs ORPO/CPO would
    # turn NaN on. None in records written before they were counted.
    rows_given: int | None = None
    rows_trained: int | None = None
    # Of the rows trained, those with a sequence cut at max_length (its tokens past it never
    # trained; train_tokens counts only what was kept). None in records written before.
    rows_truncated: int | None = None
    # Throughput (posttrain.telemetry, where the formulas are stated), over the trainer's
    # training-loop time (train_runtime_s: no model loading, tokenising or precomputed
    # reference log-probs; this attempt only when resumed), for the whole job (all processes).
    tokens_real: int | None = None           # non-padding tokens of the trained forwards
    tokens_padded: int | None = None         # tokens of their batches, padding included
    train_runtime_s: float | None = None
    tokens_per_s_real: float | None = None
    tokens_per_s_padded: float | None = None
    model_flops: float | None = None         # PaLM-style model FLOPs of the counted forwards
    peak_flops_per_device: float | None = None  # the device's dense bf16/fp16 peak (None: CPU, fp32, unknown)
    mfu: float | None = None                 # model_flops / train_runtime_s / (peak x world_size)
    world_size: int | None = None            # processes that trained the stage
    device_name: str | None = None           # "cpu" or torch.cuda.get_device_name()
    peak_memory_reserved_mb: float | None = None  # GPU only: the caching allocator's peak reserve
    extra: dict = field(default_factory=dict)  # a method's own counts (DPO: reference_logps_cached)

    _TYPES: ClassVar[dict] = {"optimizer_steps": NUMBER, "examples_seen": NUMBER, "train_tokens": NUMBER,
                              "forward_passes": NUMBER, "backward_passes": NUMBER, "wall_s": NUMBER,
                              "resumed_from_step": (int, type(None)), "peak_memory_mb": NUMBER,
                              "peak_memory_kind": (str, type(None)), "rows_given": (int, type(None)),
                              "rows_trained": (int, type(None)), "rows_truncated": (int, type(None)),
                              "tokens_real": (int, type(None)), "tokens_padded": (int, type(None)),
                              "train_runtime_s": NUMBER + (type(None),), "tokens_per_s_real": NUMBER + (type(None),),
                              "tokens_per_s_padded": NUMBER + (type(None),), "model_flops": NUMBER + (type(None),),
                              "peak_flops_per_device": NUMBER + (type(None),), "mfu": NUMBER + (type(None),),
                              "world_size": (int, type(None)), "device_name": (str, type(None)),
                              "peak_memory_reserved_mb": NUMBER + (type(None),)}

    @property
    def rows_dropped(self) -> int:
        return (self.rows_given - self.rows_trained) if None not in (self.rows_given, self.rows_trained) else 0

    @classmethod
    def from_json(cls, data) -> Cost:
        if not isinstance(data, dict):
            raise BadRecord("cost is not a JSON object")
        wrong = _wrong_types(data, cls._TYPES, "cost.")
        if wrong:
            raise BadRecord(f"wrong type for {', '.join(wrong)}")
        known = {name: data[name] for name in cls._TYPES if name in data}
        return cls(**known, extra={k: v for k, v in data.items() if k not in cls._TYPES})

    def to_json(self) -> dict:
        """Row counts are written when known; throughput whenever it was measured (its
        nulls then say "not available here", e.g. MFU on CPU)."""
        def unknown(name: str) -> bool:
            return ((name in ROW_COUNTS and getattr(self, name) is None)
                    or (name in THROUGHPUT and self.tokens_real is None))

        return {**{name: getattr(self, name) for name in self._TYPES if not unknown(name)}, **self.extra}


# The report's cost columns: {field: (label, number format)}, in the order of Cost's fields.
COST_COLUMNS = {f.name: (f.metadata["label"], f.metadata["format"]) for f in fields(Cost) if f.metadata}
# The report's throughput columns (a pipeline's: tokens over its stages' summed training
# time; MFU its FLOPs over the summed time x peak x world size); None shows "n/a".
THROUGHPUT_COLUMNS = {"tokens_per_s_real": ("tokens/s (real)", ",.0f"),
                      "tokens_per_s_padded": ("tokens/s (padded)", ",.0f"),
                      "mfu": ("MFU", ".1%"), "world_size": ("world size", ".0f")}


@dataclass(frozen=True)
class StageRecord:
    """A trained stage: what it is, what it started from, what it trained on and cost.

    Every format-1 field has a field here (a key no version wrote would be dropped);
    a field added since then defaults when an older record lacks it.
    """

    stage: str
    seed: int
    key: str
    chain: list[str]
    adapter: bool                      # the model folder holds a LoRA adapter, not full weights
    cost: Cost
    metrics: dict                      # final losses / rewards from the trainer log
    method: str | None = None
    parent_key: str | None = None
    start_model: str | None = None
    settings: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # name, format, examples, fingerprint, skipped_rows
    key_inputs: dict | None = None     # what the key hashes (absent in records from before issue 11)
    cache_dir: str | None = None       # the run directory's copy only: the stage's cache entry
    reused: bool | None = None         # the run directory's copy only: taken from the cache
    # How it trained: world_size, per_device_batch, gradient_accumulation, global_batch,
    # strategy, precision, bf16, device (plan.resolved). None in records written before.
    resolved: dict | None = None

    # What the pipeline, `plan` and the report need; a record without them is unusable.
    REQUIRED: ClassVar[dict] = {"stage": (str,), "seed": (int,), "key": (str,), "chain": (list,),
                                "adapter": (bool,), "cost": (dict,), "metrics": (dict,)}
    _OPTIONAL: ClassVar[dict] = {"method": (str, type(None)), "parent_key": (str, type(None)),
                                 "start_model": (str, type(None)), "settings": (dict,), "data": (dict,),
                                 "key_inputs": (dict, type(None)), "cache_dir": (str, type(None)),
                                 "reused": (bool, type(None)), "resolved": (dict, type(None))}
    _ALWAYS: ClassVar[tuple] = ("stage", "method", "seed", "key", "chain", "parent_key", "start_model", "adapter",
                                "settings", "data", "metrics")

    @classmethod
    def from_json(cls, data, key: str | None = None) -> StageRecord:
        """The record in a parsed stage.json; BadRecord says why it cannot be used
        (`key`: the stage it must be the record of)."""
        if not isinstance(data, dict):
            raise BadRecord("not a JSON object")
        _check_format(data)
        missing = [f"{name} (a {kinds[0].__name__})" for name, kinds in cls.REQUIRED.items()
                   if not isinstance(data.get(name), kinds) or (kinds[0] is int and isinstance(data.get(name), bool))]
        if missing:
            raise BadRecord("lacks valid " + ", ".join(missing))
        if key is not None and data["key"] != key:
            raise BadRecord(f"is the record of stage {data['key'][:12]}, not of {key[:12]}")
        wrong = _wrong_types(data, cls._OPTIONAL)
        if wrong:
            raise BadRecord(f"wrong type for {', '.join(wrong)}")
        known = {f.name: data[f.name] for f in fields(cls) if f.name in data and f.name != "cost"}
        return cls(**known, cost=Cost.from_json(data["cost"]))

    def to_json(self) -> dict:
        out = {name: getattr(self, name) for name in self._ALWAYS}
        out.update(format=FORMAT, cost=self.cost.to_json())
        for name in ("key_inputs", "cache_dir", "reused", "resolved"):  # absent when unknown, as before
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def read(cls, path: Path, key: str | None = None) -> StageRecord:
        """The one reader of a stage.json file: a damaged one is a DataError naming it."""
        try:
            return cls.from_json(read_json(path), key)
        except BadRecord as exc:
            raise DataError(f"{path}: {exc} ({DAMAGED_HINT})") from None

    def write(self, area, path: Path) -> Path:
        """The one writer (`area`: the run directory's or the cache's guard)."""
        return area.write_json(path, self.to_json())


# ---------------------------------------------------------------- result rows


@dataclass(frozen=True)
class ResultRow:
    """One line of results.jsonl: a pipeline's (or model's) score on one task metric."""

    pipeline: str
    seed: int | None                   # None: an untrained or external model
    task: str
    metric: str
    value: float | None
    stderr: float | None = None
    samples: str | None = None         # its per-sample records, relative to the run directory
    eval_spec: str | None = None       # hash of everything that defines the evaluation
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as written

    REQUIRED: ClassVar[tuple[str, ...]] = ("pipeline", "seed", "task", "metric", "value")
    # The fields the report computes with; the others are passed through as written.
    _TYPES: ClassVar[dict] = {"pipeline": (str,), "seed": (int, type(None)), "task": (str,), "metric": (str,),
                              "value": (int, float, type(None))}
    _FIELDS: ClassVar[tuple] = ("pipeline", "seed", "task", "metric", "value", "stderr", "samples", "eval_spec")

    @classmethod
    def from_json(cls, data: dict) -> ResultRow:
        missing = [name for name in cls.REQUIRED if name not in data]
        if missing:
            raise BadRecord(f"missing {', '.join(map(repr, missing))}")
        wrong = _wrong_types(data, cls._TYPES)
        if wrong:
            raise BadRecord(f"wrong type for {', '.join(wrong)}")
        # `samples` is checked by its reader (it must name a file inside the run directory).
        return cls(**{name: data[name] for name in cls._FIELDS if name in data},
                   extra={k: v for k, v in data.items() if k not in cls._FIELDS})

    def to_json(self) -> dict:
        return {**{name: getattr(self, name) for name in self._FIELDS}, **self.extra}

    @property
    def column(self) -> str:
        return f"{self.task}/{self.metric}"


def read_results(path: Path, check: Callable[[ResultRow], str | None] | None = None) -> list[ResultRow]:
    """The one reader of results.jsonl; `check(row)` says why a row cannot be used (or None)."""
    def parse(data: dict) -> ResultRow:
        row = ResultRow.from_json(data)
        problem = check(row) if check else None
        if problem:
            raise BadRecord(problem)
        return row

    return read_jsonl(path, parse=parse)


def write_results(area, path: Path, rows: list[ResultRow]) -> Path:
    """The one writer of results.jsonl: a row a line, keys sorted (a diff shows what changed)."""
    return area.write_text(path, "".join(json.dumps(row.to_json(), sort_keys=True) + "\n" for row in rows))
