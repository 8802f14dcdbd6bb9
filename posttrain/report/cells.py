"""The report's tables, built once from report.json, whatever renders them.

A `Table` is columns and rows of `Cell`s. A cell holds the plain text every renderer
shows (terminal, Markdown, HTML, the W&B table) and what it is made of: the number,
its interval, whether a difference is significant. Renderers add only layout: rich
escapes the text, Markdown escapes pipes, HTML wraps the interval and the mark in
styled spans and shows an empty number as a dash.

Tolerant: report.json may lack fields (an edited or older report); a missing value is
an empty cell, never an exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from posttrain.records import COST_COLUMNS, THROUGHPUT_COLUMNS

SIGNIFICANT = "\u2731"  # ✱: a difference whose interval excludes zero


@dataclass(frozen=True)
class Cell:
    """One cell: `text` is what it shows; numbers keep what they were made from."""

    shown: str = ""                  # the value as written: a name, a count, a mean ("" when none)
    interval: str = ""               # "[lo, hi]" beside a mean or a difference
    value: float | None = None       # the number behind `shown`, as recorded (not in percent)
    lo: float | None = None
    hi: float | None = None
    significant: bool | None = None  # a difference whose interval excludes zero (None: not a difference)

    @property
    def text(self) -> str:
        text = f"{self.shown} {self.interval}" if self.interval else self.shown
        return f"{text} {SIGNIFICANT}" if self.significant else text


@dataclass(frozen=True)
class Column:
    label: str                       # the header's text
    kind: str = "text"               # name | text | number | mean | delta
    metric: str = ""                 # the quality table: the task metric a mean or delta belongs to
    percent: bool = False            # shown in percent (a delta: in percentage points)


@dataclass(frozen=True)
class Row:
    cells: tuple[Cell, ...]
    baseline: bool = False           # the pipeline every delta is measured against
    label: str = ""                  # what a renderer may show apart (a sample's doc id)


@dataclass(frozen=True)
class Table:
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]

    @property
    def header(self) -> list[str]:
        return [column.label for column in self.columns]

    def text_rows(self) -> list[list[str]]:
        return [[cell.text for cell in row.cells] for row in self.rows]


# ---------------------------------------------------------------- numbers


def number(value) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def stat(entry) -> tuple[float | None, float | None, float | None]:
    """(mean, lo, hi) of an interval entry of report.json."""
    if not isinstance(entry, dict):
        return None, None, None
    return number(entry.get("mean")), number(entry.get("lo")), number(entry.get("hi"))


def fmt(value: float | None, percent: bool, signed: bool = False, spec: str = ".3g") -> str:
    """A fraction in percent with one decimal; anything else with `spec`; "?" when absent."""
    if value is None:
        return "?"
    sign = "+" if signed else ""
    return f"{100 * value:{sign}.1f}" if percent else f"{value:{sign}{spec}}"


def interval_cell(entry, percent: bool, signed: bool = False, spec: str = ".3g") -> Cell:
    """A mean (or a difference, `signed`) with its interval; empty when there is no mean."""
    mean, lo, hi = stat(entry)
    if mean is None:
        return Cell()
    interval = f"[{fmt(lo, percent, signed, spec)}, {fmt(hi, percent, signed, spec)}]" if (lo, hi) != (None, None) \
        else ""
    significant = (entry.get("significant") is True) if signed else None
    return Cell(fmt(mean, percent, signed, spec), interval, mean, lo, hi, significant)


def count_cell(value, spec: str) -> Cell:
    value = number(value)
    return Cell() if value is None else Cell(f"{value:{spec}}", value=value)


# ---------------------------------------------------------------- what the tables show


def pipelines(report: dict) -> list[dict]:
    return [p for p in report.get("pipelines") or [] if isinstance(p, dict) and "name" in p]


def columns(report: dict) -> list[str]:
    """The quality columns (task/metric), with any a pipeline has that "columns" lacks."""
    out = list(report.get("columns") or [])
    for pipeline in pipelines(report):
        out += [column for column in pipeline.get("metrics") or {} if column not in out]
    return out


def is_fraction(report: dict, column: str) -> bool:
    """True when every value of the column lies in [0, 1] (accuracy, exact match): shown
    in percent. Other metrics (a perplexity, a log-likelihood) are shown as they are."""
    seen = False
    for pipeline in pipelines(report):
        for value in stat((pipeline.get("metrics") or {}).get(column)):
            if value is None:
                continue
            seen = True
            if not 0.0 <= value <= 1.0:
                return False
    return seen


def level(report: dict) -> str:
    """The intervals' confidence as labels write it: 0.95 -> "95%". Reports written
    before `confidence` was recorded used the default, 95%."""
    from posttrain.stats import DEFAULT_CONFIDENCE, level_text

    value = number(report.get("confidence"))
    return level_text(DEFAULT_CONFIDENCE if value is None else value)


# ---------------------------------------------------------------- the tables


def quality_table(report: dict) -> Table:
    """Per pipeline each column's mean [interval] and its paired delta vs the baseline."""
    cols = [Column("pipeline", "name"), Column("seeds", "number")]
    for column in columns(report):
        percent = is_fraction(report, column)
        cols += [Column(column, "mean", column, percent), Column(f"Δ {column}", "delta", column, percent)]
    rows = []
    for p in pipelines(report):
        cells = [Cell(str(p["name"])), Cell(str(p.get("seeds", "?")))]
        for column in cols[2:]:
            entry = (p.get("metrics") if column.kind == "mean" else p.get("delta")) or {}
            cells.append(interval_cell(entry.get(column.metric), column.percent, signed=column.kind == "delta"))
        rows.append(Row(tuple(cells), baseline=p["name"] == report.get("baseline")))
    return Table(tuple(cols), tuple(rows))


def stage_text(stage: dict) -> str:
    """`dpo`, `ipo (dpo)` when the method is not the stage's name, `(shared with ...)`."""
    name = str(stage.get("stage", "?"))
    method = stage.get("method")
    notes = [str(method)] if method and method != name else []
    shared = [str(other) for other in stage.get("shared_with") or []]
    notes += [f"shared with {', '.join(shared)}"] if shared else []
    return name + (f" ({'; '.join(notes)})" if notes else "")


# The report's footnote to the throughput columns (the formulas: posttrain.telemetry).
THROUGHPUT_NOTE = (
    "Tokens/s: the tokens of the trained forwards (real: non-padding; padded: padding included) over the "
    "trainer's training-loop time (train_runtime: no model loading, tokenising or precomputed reference "
    "log-probs), for the whole job (all processes), a pipeline's over its stages' summed time. "
    "MFU = model FLOPs / train_runtime / (device peak × world size); model FLOPs per real token: "
    "6N + 12·L·A·t trained (PaLM, appendix B), 2N + 4·L·A·t forward-only (a frozen reference, KTO's KL), N the "
    "parameters a token multiplies (all but the input embedding table; the LM head counted, even tied; with "
    "LoRA the base's too), L layers, A attention width, t the token's sequence length. Peak: the device's "
    "dense bf16/fp16 datasheet figure (H100 SXM 989 TFLOP/s); n/a on CPU, in float32, on an unlisted device, "
    "or in records written before it was measured.")


def cost_table(report: dict) -> Table:
    cols = [Column("pipeline", "name"), Column("stages")]
    cols += [Column(label, "number") for label, _ in COST_COLUMNS.values()]
    cols += [Column(label, "number") for label, _ in THROUGHPUT_COLUMNS.values()]
    rows = []
    for p in pipelines(report):
        stages = [stage_text(s) for s in p.get("stages") or [] if isinstance(s, dict)]
        cost = p.get("cost") or {}
        cells = [Cell(str(p["name"])), Cell(" → ".join(stages) or "—")]
        cells += [count_cell(cost.get(key), spec) for key, (_, spec) in COST_COLUMNS.items()]
        # Not measured (an older record; MFU on CPU or an unknown device): "n/a", never a guess.
        cells += [count_cell(cost.get(key), spec) if number(cost.get(key)) is not None else Cell("n/a")
                  for key, (_, spec) in THROUGHPUT_COLUMNS.items()]
        rows.append(Row(tuple(cells), baseline=p["name"] == report.get("baseline")))
    return Table(tuple(cols), tuple(rows))


def extras_table(report: dict) -> Table | None:
    """Preference metrics on held-out pairs and mean reply length (None: neither measured)."""
    tasks = sorted({t for p in pipelines(report) for t in p.get("reply_tokens") or {}})
    has_prefs = any(p.get("preferences") for p in pipelines(report))
    if not tasks and not has_prefs:
        return None
    cols = [Column("pipeline", "name")]
    if has_prefs:
        cols += [Column("prefers chosen (%)", "mean", percent=True), Column("mean log-prob margin", "mean")]
    cols += [Column(f"reply tokens ({task})", "number") for task in tasks]
    rows = []
    for p in pipelines(report):
        prefs = p.get("preferences") or {}
        cells = [Cell(str(p["name"]))]
        if has_prefs:
            cells += [interval_cell(prefs.get("pref_acc"), True), interval_cell(prefs.get("margin"), False, spec=".2f")]
        cells += [count_cell((p.get("reply_tokens") or {}).get(task), ".1f") for task in tasks]
        rows.append(Row(tuple(cells), baseline=p["name"] == report.get("baseline")))
    return Table(tuple(cols), tuple(rows))


def curation_table(report: dict) -> Table | None:
    """Per curated dataset: rows in -> out, removals by reason and by eval task."""
    if not report.get("curation"):
        return None
    cols = (Column("dataset", "name"), Column("rows in", "number"), Column("rows out", "number"),
            Column("removed (reason: rows)"), Column("contaminated (eval task: rows)"))
    rows = []
    for name, c in report["curation"].items():
        removed = "; ".join(f"{reason}: {count}" for reason, count in (c.get("removed") or {}).items() if count)
        contaminated = "; ".join(f"{task}: {count}" for task, count in (c.get("contaminated_by_task") or {}).items())
        rows.append(Row((Cell(str(name)), count_cell(c.get("rows_in"), ",.0f"), count_cell(c.get("rows_out"), ",.0f"),
                         Cell(removed or "—"), Cell(contaminated or "—"))))
    return Table(cols, tuple(rows))


def sample_tables(report: dict) -> dict[str, Table]:
    """Per generation task: the sampled prompts, the reference and every pipeline's reply."""
    names = [str(p["name"]) for p in pipelines(report)]
    cols = (Column("prompt"), Column("reference"), *(Column(name) for name in names))
    out = {}
    for task, items in (report.get("samples") or {}).items():
        rows = []
        for item in items or []:
            if isinstance(item, dict):
                replies = item.get("replies") or {}
                cells = [Cell(str(item.get("prompt", ""))), Cell(str(item.get("target", "")))]
                cells += [Cell("" if replies.get(name) is None else str(replies[name])) for name in names]
                rows.append(Row(tuple(cells), label=f"doc {item.get('doc_id', '?')}"))
        out[str(task)] = Table(cols, tuple(rows))
    return out
