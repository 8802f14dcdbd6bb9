"""Statistics of one dataset file, for ``posttrain data inspect``.

Reads the file as a stream through the same reader and converters as training
(``posttrain.data.io.read_records``, ``formats.detect_format``/``convert_row``), so
what it reports is what a recipe would get.  Unlike loading, a malformed row is
counted and listed (``file:line: reason``), never raised: the point is to see how
much of a file is usable.

Lengths are in tokens when a ``count_tokens`` callable is given (``posttrain data
inspect`` on a recipe's dataset: the recipe's tokenizer), else in whitespace-separated
words and in characters (a text without spaces, such as Chinese, is one "word");
``stats["unit"]`` says which.  Prompt length counts every message before the final
reply (system message included); reply length is the final assistant reply
(``chosen`` for preference data, with ``rejected`` reported beside it).

Columns the layout does not read are counted (``ignored_columns``), and rows with
tool calls or tools are counted apart: loading refuses such a dataset as a whole.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Iterable

from posttrain.data.formats import FORMATS, TOOLS_UNSUPPORTED, RowError, ToolCallRow, convert_row, ignored_columns, kind_of
from posttrain.data.io import _read_hub, choose_format, peek, read_records
from posttrain.errors import DataError

PERCENTILES = (5, 25, 50, 75, 95)
SHOWN_BAD_ROWS = 5
SAMPLE_CHARS = 200           # a sample's message text is cut to this many characters
PROGRESS_MIN_BYTES = 5_000_000  # smaller files finish before a bar is worth drawing
_PROGRESS_EVERY = 2_000      # rows between progress updates (a redraw per row costs more than the row)


def inspect_source(
    path: Path,
    fmt: str = "auto",
    *,
    count_tokens: Callable[[str], int] | None = None,
    unit: str = "tokens",
    samples: int = 3,
    progress: bool = False,
    limit: int | None = None,
    split: str = "train",
    subset: str | None = None,
) -> dict:
    """Statistics of the data file at ``path`` read in layout ``fmt`` ("auto": detected);
    a folder is a dataset in the hub repo layout, read as loading reads it (``split``, ``subset``).

    Returns a JSON-serialisable dict: ``path``, ``format``, ``detected``, ``kind``,
    ``rows`` (records read), ``valid``, ``bad_rows`` (``{"count", "first"}``),
    ``tool_rows`` (``{"count", "first"}``: rows with tool calls or tools),
    ``ignored_columns`` (column -> usable rows that have it), ``turns`` (min/mean/max
    messages per example), ``unit`` (``unit`` when ``count_tokens`` is given, else
    "words (whitespace)"), ``lengths`` (``prompt``/``reply``[/``rejected``]: p5, p25,
    p50, p75, p95, max), ``characters`` (the same in characters, when counting words),
    ``duplicates`` (exact, after lower-casing and collapsing whitespace),
    ``empty_replies`` and ``samples`` (canonical examples, text cut short).
    ``limit``: stop after that many usable rows, as loading does.
    Whole-file problems (missing, unsupported type, undetectable format) raise DataError.
    """
    path = Path(path)
    if not path.is_file() and not path.is_dir():
        raise DataError(f"data file not found: {path}")
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f'unknown data format "{fmt}" (known: auto, {", ".join(sorted(FORMATS))})')
    if path.is_dir():   # as loading reads it: `datasets` infers the splits from the file names
        label, records = f"{path.name}[{split}]", _read_hub(str(path), split, folder=True, subset=subset)
    else:
        label, records = path.name, read_records(path)
    head, records = peek(records)
    chosen = choose_format(fmt, head, label)
    counters = {"lengths": count_tokens} if count_tokens else {"lengths": _words, "characters": len}
    tally = _Tally(label, counters, samples, kind_of(chosen))
    with _progress_bar(path, enabled=progress) as advance:
        for number, row in records:
            if limit is not None and len(tally.turns) >= limit:
                break
            tally.add(number, row, chosen)
            if number % _PROGRESS_EVERY == 0:
                advance(number)
    return {
        "path": f"{path}[{split}]" if path.is_dir() else str(path),
        "format": chosen,
        "detected": fmt == "auto",
        **tally.summary(),
        "unit": unit if count_tokens else WORDS,
    }


WORDS = "words (whitespace)"


# --------------------------------------------------------------------------- reading


def _words(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------- statistics


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _is_empty_reply(reason: str) -> bool:
    """Converters refuse an empty reply; these are their words for it (see formats.py)."""
    return reason.endswith(" is empty") and (
        "(assistant)" in reason or "(Assistant)" in reason
        or reason.startswith(('"output"', '"completion"', '"chosen"', '"rejected"'))
    )


class _Tally:
    """Running statistics; keeps lengths (ints), hashes and a few samples, never the rows."""

    def __init__(self, label: str, counters: dict[str, Callable[[str], int]], samples: int, kind: str):
        self.label, self.counters, self.kind = label, counters, kind
        self.rows = 0
        self.bad: list[str] = []
        self.bad_count = 0
        self.tools: list[str] = []
        self.tool_count = 0
        self.ignored: dict[str, int] = {}
        self.empty_replies = 0
        self.turns: list[int] = []
        parts = ("prompt", "reply", "rejected") if kind == "preference" else ("prompt", "reply")
        # measure ("lengths", "characters") -> part -> one value per usable row
        self.lengths: dict[str, dict[str, list[int]]] = {measure: {part: [] for part in parts} for measure in counters}
        self.labels = {True: 0, False: 0}   # unpaired data: desirable / undesirable completions
        self.seen: set[int] = set()
        self.duplicates = 0
        # Reservoir sampling: `samples` rows spread over the whole file, same ones every run.
        self.reservoir: list[tuple[int, dict]] = []
        self.capacity = samples
        self.rng = random.Random(0)

    def add(self, number: int, row: dict | Exception, fmt: str) -> None:
        self.rows += 1
        try:
            if isinstance(row, Exception):
                raise row
            example = convert_row(row, fmt)
        except ToolCallRow as error:
            self.tool_count += 1
            if len(self.tools) < SHOWN_BAD_ROWS:
                self.tools.append(f"{self.label}:{number}: {error}")
            return
        except RowError as error:
            self._bad(number, str(error))
            return
        for column in ignored_columns(row, fmt):
            self.ignored[column] = self.ignored.get(column, 0) + 1
        turns, texts, extra = self._texts(example)
        self.turns.append(turns)
        if self.kind == "unpaired":
            self.labels[example["label"]] += 1
        for measure, count in self.counters.items():
            for part, values in self.lengths[measure].items():
                values.append(count(texts[part]))
        key = hash((_normalise(texts["prompt"]), _normalise(texts["reply"]), _normalise(extra)))
        if key in self.seen:
            self.duplicates += 1
        else:
            self.seen.add(key)
        self._sample(number, example)

    def _texts(self, example: dict) -> tuple[int, dict[str, str], str]:
        """(messages in the example, the texts measured by part, what else tells duplicates apart)."""
        texts = {}
        if self.kind == "preference":
            prompt, reply = example["prompt"], example["chosen"]
            texts["rejected"] = extra = example["rejected"][0]["content"]
        elif self.kind == "unpaired":
            prompt, reply = example["prompt"], example["completion"]
            extra = str(example["label"])   # the same completion judged both ways is not a duplicate
        else:
            prompt, reply = example["messages"][:-1], example["messages"][-1:]
            extra = ""
        texts |= {"prompt": "\n".join(message["content"] for message in prompt), "reply": reply[0]["content"]}
        return len(prompt) + 1, texts, extra

    def _bad(self, number: int, reason: str) -> None:
        self.bad_count += 1
        self.empty_replies += _is_empty_reply(reason)
        if len(self.bad) < SHOWN_BAD_ROWS:
            self.bad.append(f"{self.label}:{number}: {reason}")

    def _sample(self, number: int, example: dict) -> None:
        if not self.capacity:
            return
        if len(self.reservoir) < self.capacity:
            self.reservoir.append((number, example))
        else:
            slot = self.rng.randrange(len(self.turns))  # this row is number len(turns)
            if slot < self.capacity:
                self.reservoir[slot] = (number, example)

    def summary(self) -> dict:
        valid = len(self.turns)
        return {
            "kind": self.kind,
            "rows": self.rows,
            "valid": valid,
            "bad_rows": {"count": self.bad_count, "first": self.bad},
            "tool_rows": {"count": self.tool_count, "first": self.tools},
            "ignored_columns": dict(sorted(self.ignored.items())),
            "turns": {"min": min(self.turns, default=0), "max": max(self.turns, default=0),
                      "mean": round(sum(self.turns) / valid, 2) if valid else 0.0},
            **{measure: {part: percentiles(values) for part, values in parts.items()}
               for measure, parts in self.lengths.items()},
            "duplicates": {"count": self.duplicates,
                           "rate": round(self.duplicates / valid, 4) if valid else 0.0},
            "empty_replies": self.empty_replies,
            **({"labels": {"desirable": self.labels[True], "undesirable": self.labels[False]}}
               if self.kind == "unpaired" else {}),
            "samples": [{"row": number, **_shorten(example)}
                        for number, example in sorted(self.reservoir, key=lambda pair: pair[0])],
        }


def percentiles(values: Iterable[int]) -> dict[str, int]:
    """Nearest-rank p5..p95 and max: each is a length that occurs in the data."""
    ordered = sorted(values)
    if not ordered:
        return {**{f"p{p}": 0 for p in PERCENTILES}, "max": 0}
    n = len(ordered)
    out = {f"p{p}": ordered[max(math.ceil(p / 100 * n), 1) - 1] for p in PERCENTILES}
    out["max"] = ordered[-1]
    return out


def _shorten(example: dict) -> dict:
    def cut(text: str) -> str:
        return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + f"... (+{len(text) - SAMPLE_CHARS} chars)"

    # Message lists are cut; other fields (preference scores) are kept as they are.
    return {field: [{"role": m["role"], "content": cut(m["content"])} for m in value]
            if isinstance(value, list) else value
            for field, value in example.items()}


# --------------------------------------------------------------------------- progress


class _NoProgress:
    def __enter__(self) -> Callable[[int], None]:
        return lambda done: None

    def __exit__(self, *exc) -> None:
        return None


class _RichProgress:
    """A rows bar on stderr; the total is the line count for line-based files, else unknown."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Callable[[int], None]:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        total = _count_lines(self.path) if self.path.suffix.lower() in (".jsonl", ".ndjson", ".csv") else None
        self.bar = Progress(TextColumn("inspecting {task.description}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.path.name, total=total)
        return lambda done: self.bar.update(task, completed=done)

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def _progress_bar(path: Path, *, enabled: bool):
    if enabled and path.stat().st_size > PROGRESS_MIN_BYTES:
        return _RichProgress(path)
    return _NoProgress()


def _count_lines(path: Path) -> int:
    lines = 0
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            lines += chunk.count(b"\n")
    return lines


# --------------------------------------------------------------------------- rendering


def format_inspection(stats: dict) -> str:
    """``inspect_source``'s dict as plain text for the terminal."""
    valid, bad = stats["valid"], stats["bad_rows"]
    how = "detected" if stats["detected"] else "given"
    turns = stats["turns"]
    dup = stats["duplicates"]
    tools = stats.get("tool_rows") or {"count": 0, "first": []}
    lines = [
        f"{stats['path']}",
        f"  format      {stats['format']} ({how}), {stats['kind']} data",
        f"  rows        {stats['rows']:,} read: {valid:,} usable, {bad['count']:,} malformed"
        + (f", {tools['count']:,} with tool calls" if tools["count"] else ""),
        *_ignored_line(stats.get("ignored_columns") or {}),
        f"  turns       min {turns['min']}, mean {turns['mean']:.2f}, max {turns['max']} messages per example",
        f"  duplicates  {dup['count']:,} exact ({dup['rate']:.1%}; case and whitespace ignored)",
        f"  empty replies {stats['empty_replies']:,}" + (" (counted among the malformed rows)"
                                                       if stats["empty_replies"] else ""),
        *([f"  labels      {stats['labels']['desirable']:,} desirable, {stats['labels']['undesirable']:,} undesirable"]
          if "labels" in stats else []),
        *_length_table(f"lengths in {stats['unit']}", stats["lengths"]),
        *(_length_table("lengths in characters", stats["characters"]) if "characters" in stats else []),
    ]
    if tools["count"]:
        rows = f"{tools['count']:,} row{'s' if tools['count'] != 1 else ''}"
        lines.append(f"  tool calls: {rows}; loading refuses this dataset: {TOOLS_UNSUPPORTED}")
        lines += [f"    {message}" for message in tools["first"]]
    if bad["count"]:
        lines.append(f"  malformed rows (first {len(bad['first'])} of {bad['count']:,}):")
        lines += [f"    {message}" for message in bad["first"]]
    if stats["samples"]:
        lines.append(f"  samples ({len(stats['samples'])}):")
        for sample in stats["samples"]:
            lines.append(f"    row {sample['row']}:")
            for field, messages in sample.items():
                if not isinstance(messages, list):
                    if field != "row":
                        lines.append(f"      {field}: {messages}")
                    continue
                for message in messages:
                    text = message["content"].replace("\n", "\\n")
                    label = message["role"] if field in ("messages", "prompt") else f"{message['role']} ({field})"
                    lines.append(f"      {label}: {text}")
    return "\n".join(lines)


def _length_table(title: str, lengths: dict[str, dict[str, int]]) -> list[str]:
    lines = [f"  {title}:",
             "    " + f"{'':<9}" + "".join(f"{name:>8}" for name in [*(f"p{p}" for p in PERCENTILES), "max"])]
    for name, values in lengths.items():
        lines.append("    " + f"{name:<9}" + "".join(f"{value:>8,}" for value in values.values()))
    return lines


def _ignored_line(ignored: dict[str, int]) -> list[str]:
    """"ignored columns: id, source (300 rows)": columns grouped by how many rows have them."""
    if not ignored:
        return []
    groups: dict[int, list[str]] = {}
    for column, rows in ignored.items():
        groups.setdefault(rows, []).append(column)
    parts = [f"{', '.join(columns)} ({rows:,} row{'s' if rows != 1 else ''})"
             for rows, columns in sorted(groups.items(), key=lambda item: -item[0])]
    return [f"  ignored columns: {'; '.join(parts)}"]
