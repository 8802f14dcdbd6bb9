"""Read data files and hub datasets into canonical examples, reporting every bad row.

The contract with users: a malformed row is never a traceback and never a silent
drop.  Each one becomes ``<file>:<line>: <reason>``; with ``on_bad_rows: error`` (the
default) they are all raised together in one :class:`DataError`, with
``on_bad_rows: skip`` they are skipped and listed in ``LoadResult.skipped``.

Row numbers: the 1-based line for JSON lines and CSV (the CSV header is line 1; a
record spanning lines is numbered by its first line), the 1-based record index for a
JSON array, a parquet file or a hub dataset.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from posttrain.data.formats import (FORMATS, KIND_NEEDS, TOOLS_UNSUPPORTED, RowError, ToolCallRow, can_feed,
                                    convert_row, detect_format, kind_of, to_kind)
from posttrain.errors import DataError

Record = tuple[int, "dict | Exception"]

MAX_REPORTED = 20  # bad-row messages shown in one error; the rest are counted
DETECT_ROWS = 20  # rows whose keys decide the format when format is "auto"
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
# CSV cells are text; these columns may hold JSON (lists of messages, history pairs).
JSON_COLUMNS = {"messages", "conversations", "history", "prompt", "completion", "chosen", "rejected",
                "chosen_messages", "rejected_messages"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadResult:
    """Canonical examples plus how they were read, for the run log and the report."""

    examples: list[dict]
    format: str
    detected: bool
    skipped: list[str] = field(default_factory=list)
    source: str = ""


# --------------------------------------------------------------------------- reading


def read_records(path: str | Path) -> Iterator[Record]:
    """Yield ``(row number, row)`` from a data file; a bad row comes as an exception value.

    Yielding (not raising) lets the caller report every bad row at once.  Problems
    with the file as a whole (unknown type, unreadable array) raise DataError.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_json_lines(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(
        f"{path}: unsupported data file type {suffix or '(no extension)'!r} "
        f"(use {', '.join(DATA_SUFFIXES)})"
    )


# Python's json parser recurses once per level; a row nested ~1,000 levels deep is not data.
TOO_DEEP = "nested too deeply to be a data row (JSON arrays/objects inside each other ~1,000 levels or more)"
# ... and refuses (ValueError) to convert an integer of more than 4,300 digits.
TOO_MANY_DIGITS = "holds a number of more than 4,300 digits, which Python's JSON reader refuses"


def _parse_line(raw: bytes) -> dict | Exception:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return RowError(f"not valid UTF-8 (byte {error.start + 1} of the line)")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        return RowError(f"not valid JSON: {error.msg} (column {error.colno})")
    except RecursionError:
        return RowError(TOO_DEEP)
    except ValueError:  # (after JSONDecodeError, a ValueError too)
        return RowError(TOO_MANY_DIGITS)
    return _as_object(row)


def _as_object(row: Any) -> dict | Exception:
    if isinstance(row, dict):
        return row
    kind = "a list" if isinstance(row, list) else type(row).__name__
    return RowError(f"a row must be a JSON object, not {kind}")


def _read_json_lines(path: Path) -> Iterator[Record]:
    """One JSON object per line; blank lines are skipped, numbering stays physical."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
            if raw.strip():
                yield number, _parse_line(raw)


def _read_json(path: Path) -> Iterator[Record]:
    """A JSON array (or ``{"data": [...]}``); a ``.json`` file that is really JSON lines works too."""
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        document = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise DataError(f"{path.name}: {TOO_DEEP}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        if raw.lstrip().startswith(b"{"):  # several objects, one per line: JSON lines
            return _read_json_lines(path)
        raise DataError(f"{path.name}: not a valid JSON file: {_describe(error)}") from None
    except ValueError:
        raise DataError(f"{path.name}: {TOO_MANY_DIGITS}") from None
    records = _records_of(document, path)
    return ((number, _as_object(row)) for number, row in enumerate(records, 1))


def _describe(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} (line {error.lineno}, column {error.colno})"
    return f"not valid UTF-8 (byte {error.start + 1})"


def _records_of(document: Any, path: Path) -> list:
    """The list of records in a JSON document: the array itself, or an object's only list."""
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        if len(document) == 1:
            key, value = next(iter(document.items()))
            # {"data": [...]} wraps the records; {"messages": [...]} is itself one record.
            if isinstance(value, list) and key not in JSON_COLUMNS:
                return value
        return [document]
    raise DataError(f"{path.name}: expected a JSON array of objects, got {type(document).__name__}")


def _read_csv(path: Path) -> Iterator[Record]:
    """CSV with a header row; cells of message-like columns may hold JSON lists."""
    # surrogateescape keeps reading past bad bytes so they can be reported per row.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return
        start = reader.line_num + 1
        for cells in reader:
            if any(cell.strip() for cell in cells):
                yield start, _csv_row(header, cells)
            start = reader.line_num + 1


def _csv_row(header: list[str], cells: list[str]) -> dict | Exception:
    try:
        "".join(cells).encode("utf-8")
    except UnicodeEncodeError:
        return RowError("not valid UTF-8")
    if len(cells) != len(header):
        return RowError(f"has {len(cells)} cells, the header has {len(header)}")
    return {key: _csv_value(key, cell) for key, cell in zip(header, cells)}


def _csv_value(key: str, cell: str) -> Any:
    if key in JSON_COLUMNS and cell.lstrip()[:1] in ("[", "{"):
        try:
            value = json.loads(cell)
        except (ValueError, RecursionError):  # not JSON (or a number JSON refuses): the text itself
            return cell
        return value if isinstance(value, (list, dict)) else cell
    return cell


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq  # lazy: pyarrow is heavy and only needed here

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path.name}: not a readable parquet file: {error}") from None
    rows = (row for batch in parquet.iter_batches() for row in batch.to_pylist())
    return ((number, _as_object(row)) for number, row in enumerate(rows, 1))


def _read_hub(name: str, split: str, folder: bool = False, subset: str | None = None) -> Iterator[Record]:
    """A Hugging Face Hub dataset, or a folder in a hub dataset's layout (a downloaded
    repo: `data/<split>-00000-of-00001.parquet`, ...), through ``datasets``, which infers
    the splits from the file names as it does on the hub (imported only when used)."""
    try:
        import datasets

        dataset = datasets.load_dataset(name, subset, split=split)
    except Exception as error:  # network, auth, missing split: all are user-fixable
        where = "the folder" if folder else "the Hugging Face Hub"
        raise DataError(
            f"could not load dataset {name!r} ({f'subset {subset!r}, ' if subset else ''}split {split!r}) from "
            f"{where}: "
            f"{type(error).__name__}: {error}"
        ) from None
    return ((number, _as_object(row)) for number, row in enumerate(dataset, 1))


# --------------------------------------------------------------------------- loading


def _locate(source: str, base_dir: Path | None) -> tuple[Path | None, str]:
    """A local path (resolved against the recipe's folder) or, failing that, a hub id."""
    if source.startswith("hf:"):
        return None, source[3:]
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if path.exists():
        if path.is_dir():
            return path, ""    # a hub dataset's repo layout, read by `datasets` (_read_hub)
        problem = not_regular_file(path)
        if problem:
            raise DataError(f"data source {problem}")
        return path, ""
    if _HUB_ID.match(source) and not source.lower().endswith(DATA_SUFFIXES):
        return None, source
    raise DataError(f"data file not found: {path}")


def not_regular_file(path: Path) -> str | None:
    """Why an existing path that is not a folder cannot be read as a data file, or None.

    Only a regular file (a symbolic link is followed) has an end: a FIFO blocks reading
    forever, a device such as /dev/zero (even behind a link named `z.jsonl`) never ends and
    fills memory. Checked before anything is opened.
    """
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"cannot be read: {path}: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    target = f" (a link to {path.resolve()})" if path.is_symlink() else ""
    return f"is {kind}, not a regular file: {path}{target}"


def _check_options(fmt: str, on_bad_rows: str, want: str | None) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f'unknown data format "{fmt}" (known: auto, {", ".join(sorted(FORMATS))})')
    if on_bad_rows not in ("error", "skip"):
        raise DataError(f'on_bad_rows must be "error" or "skip", not "{on_bad_rows}"')
    if want not in (None, *KIND_NEEDS):
        raise DataError(f'want must be one of {", ".join(KIND_NEEDS)}, not "{want}"')


def peek(records: Iterator[Record]) -> tuple[list[dict], Iterator[Record]]:
    """The first good rows (for format detection) without losing them from the stream."""
    head: list[Record] = []
    rows: list[dict] = []
    for record in records:
        head.append(record)
        if isinstance(record[1], dict):
            rows.append(record[1])
            if len(rows) == DETECT_ROWS:
                break
    return rows, itertools.chain(head, records)


def choose_format(fmt: str, rows: list[dict], label: str) -> str:
    """`fmt`, or the layout detected from `rows` (never from the stage that reads them)."""
    if fmt != "auto":
        return fmt
    if not rows:
        raise DataError(f"{label}: no readable rows to detect the format from")
    try:
        return detect_format(rows)
    except ValueError as error:
        raise DataError(f"{label}: {error}") from None


def _check_kind(fmt: str, want: str | None, label: str) -> None:
    if want is not None and not can_feed(kind_of(fmt), want):
        raise DataError(f'{label}: this stage needs {KIND_NEEDS[want]}, but this is {kind_of(fmt)} data '
                        f'(format "{fmt}")')


def _convert_all(
    records: Iterable[Record], fmt: str, label: str, limit: int | None
) -> tuple[list[dict], list[str]]:
    """Convert rows until ``limit`` examples; collect one message per bad row.

    A row with tool calls or tools refuses the whole dataset at once, whatever
    ``on_bad_rows`` says (see ``tools_refused``).
    """
    examples: list[dict] = []
    problems: list[str] = []
    for number, row in records:
        if limit is not None and len(examples) >= limit:
            break
        try:
            if isinstance(row, Exception):
                raise row
            example = convert_row(row, fmt)
        except ToolCallRow as error:
            raise tools_refused(f"{label}:{number}", str(error)) from None
        except RowError as error:
            problems.append(f"{label}:{number}: {error}")
            continue
        examples.append(example)
    return examples, problems


def tools_refused(place: str, where: str) -> DataError:
    """The one error for a dataset with tool calls, naming its first such row.

    Never per row: skipping only the rows with calls would train on a different
    dataset than the one named (the conversations around tools, without them), and
    keeping them without their calls would train on replies to calls never shown.
    """
    return DataError(f"{place}: {where}: {TOOLS_UNSUPPORTED}")


def _capped(problems: list[str]) -> list[str]:
    extra = len(problems) - MAX_REPORTED
    return problems[:MAX_REPORTED] + ([f"... and {extra} more"] if extra > 0 else [])


def load_examples(
    source: str,
    fmt: str = "auto",
    *,
    split: str = "train",
    on_bad_rows: str = "error",
    want: str | None = None,
    base_dir: Path | None = None,
    limit: int | None = None,
    convert: bool = True,
    subset: str | None = None,
) -> LoadResult:
    """Load ``source`` (file or hub id) in layout ``fmt`` as canonical examples.

    ``want`` is the kind the consuming stage needs; the examples are converted to it
    (``formats.to_kind``: preference data feeding an instruction stage is projected
    to prompt + chosen, pairs are unpaired for KTO); instruction data cannot feed
    a preference stage (DataError).  ``convert=False`` checks that but returns the
    examples in their own kind (``sources`` curates them before converting).
    ``limit`` caps the number of source rows kept (pairs, before any unpairing).
    """
    _check_options(fmt, on_bad_rows, want)
    path, hub_name = _locate(str(source), base_dir)
    if path is not None and path.is_dir():
        label, records = f"{path.name}[{split}]", _read_hub(str(path), split, folder=True, subset=subset)
    elif path is not None:
        label, records = path.name, read_records(path)
    else:
        label, records = f"{hub_name}[{split}]", _read_hub(hub_name, split, subset=subset)
    sample, records = peek(iter(records))
    if fmt == "auto" and not sample:  # every row is bad (peek read them all): say why
        problems = [f"{label}:{number}: {row}" for number, row in records]
        raise DataError(f"{label}: no readable rows to detect the format from", problems=_capped(problems))
    chosen_format = choose_format(fmt, sample, label)
    _check_kind(chosen_format, want, label)
    examples, problems = _convert_all(records, chosen_format, label, limit)
    if problems and on_bad_rows == "error":
        count = len(problems)
        raise DataError(
            f"{label}: {count} malformed row{'s' if count != 1 else ''} "
            "(set on_bad_rows: skip to skip them)",
            problems=_capped(problems),
        )
    if not examples and limit != 0:
        reason = f" ({len(problems)} malformed rows skipped)" if problems else ""
        raise DataError(f"{label}: no usable examples{reason}", problems=_capped(problems))
    if want is not None and convert:
        examples = to_kind(examples, kind_of(chosen_format), want)
    return LoadResult(examples=examples, format=chosen_format, detected=fmt == "auto",
                      skipped=problems, source=str(source))
