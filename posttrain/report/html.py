"""report.json -> one self-contained HTML page (inline CSS, plots as base64 data URIs).

The tables come from `cells` (the same cells as the terminal and Markdown); this
module adds only layout: styled intervals and significance marks, a dash for an
empty number, the comparison table's grouped header, samples as cards. The same
report gives the same bytes.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from posttrain.report.cells import (SIGNIFICANT, THROUGHPUT_NOTE, Cell, Column, Table, cost_table, curation_table, extras_table,
                                    level, pipelines, quality_table, sample_tables)

NAME = ' class="name"'   # the pipeline's (or dataset's) column: left-aligned, bold
COST_NOTE = (
    "Cost of producing each pipeline's model, summed over its stages (mean over seeds; peak memory is the "
    "maximum). A stage marked \u201cshared with X\u201d was trained once and reused: its cost also appears in X's row.")

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#222;margin:0;background:#fafafa}
main{max-width:1200px;margin:0 auto;padding:24px 32px 64px;background:#fff}
h1{margin:0 0 8px;font-size:26px}
h2{margin:36px 0 10px;font-size:20px;border-bottom:2px solid #eee;padding-bottom:4px}
h3{margin:22px 0 8px;font-size:16px}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:4px 16px;margin:8px 0 0;font-size:14px}
dl.meta dt{color:#666}dl.meta dd{margin:0}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:90%;background:#f3f3f3;padding:1px 4px;border-radius:3px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:14px;margin:6px 0}
th,td{border:1px solid #ddd;padding:5px 9px;text-align:right;vertical-align:top;white-space:nowrap}
th{background:#f4f6f8;text-align:center}
td.name,th.name{text-align:left;font-weight:600}
td.text{text-align:left;white-space:normal}
tr.baseline td{background:#fff7ef}
.ci{color:#777;font-size:12px}
.delta{color:#888}
.delta.sig{color:#111;font-weight:700;background:#e9f3ea}
.delta.sig.neg{background:#fbeaea}
.mark{color:#b35900}
.na{color:#aaa}
.legend,.note{font-size:13px;color:#555;margin:4px 0 0}
.plots{display:flex;flex-wrap:wrap;gap:0 24px;align-items:flex-start}
figure{margin:12px 0 20px}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:13px;color:#555}
.sample{border:1px solid #e3e3e3;border-radius:6px;padding:10px 14px;margin:10px 0 16px}
.sample .label{font-size:12px;color:#666;text-transform:uppercase;letter-spacing:.04em;margin:6px 0 2px}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-family:ui-monospace,Menlo,Consolas,monospace;
font-size:13px;background:#f7f7f7;border-radius:4px;padding:6px 8px}
.replies{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:10px;margin-top:8px}
.reply{border:1px solid #eee;border-radius:4px;padding:6px}
.reply.baseline{border-color:#f0b27a}
.reply .who{font-weight:600;font-size:13px;margin-bottom:4px}
ul.notes{font-size:14px}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _minus(text: str) -> str:
    """Typographic minus signs in numbers (a hyphen is narrower than a plus)."""
    return text.replace("-", "\u2212")


def _number_td(cell: Cell, column: Column, baseline: bool) -> str:
    """A mean or a difference with its interval; the mark and colour for a significant one."""
    if not cell.shown:
        return '<td class="na">baseline</td>' if baseline and column.kind == "delta" else '<td class="na">\u2014</td>'
    shown, interval = _e(_minus(cell.shown)), _e(_minus(cell.interval))
    if column.kind != "delta":
        return f'<td>{shown} <span class="ci">{interval}</span></td>' if interval else f"<td>{shown}</td>"
    text = f"{shown} {interval}" if interval else shown
    if cell.significant:
        neg = " neg" if cell.value < 0 else ""
        return (f'<td class="delta sig{neg}" title="significant">{text} '
                f'<span class="mark">{SIGNIFICANT}</span></td>')
    return f'<td class="delta" title="not significant">{text}</td>'


def _td(cell: Cell, column: Column, baseline: bool = False, name_tag: str = "") -> str:
    if column.kind == "name":
        return f'<td class="name">{_e(cell.text)}{name_tag if baseline else ""}</td>'
    if column.kind in ("mean", "delta"):
        return _number_td(cell, column, baseline)
    if column.kind == "number":
        return f"<td>{_e(cell.text)}</td>" if cell.shown else '<td class="na">\u2014</td>'
    return f'<td class="text">{_e(cell.text)}</td>'


def _table(table: Table, head: str | None = None, name_tag: str = "") -> str:
    """A table in a scrolling box; `head`: a header other than one row of labels."""
    if head is None:
        head = "<tr>" + "".join(f'<th{NAME if c.kind == "name" else ""}>{_e(c.label)}</th>'
                                for c in table.columns) + "</tr>"
    body = []
    for row in table.rows:
        cells = "".join(_td(cell, column, row.baseline, name_tag) for cell, column in zip(row.cells, table.columns))
        body.append(f'<tr class="baseline">{cells}</tr>' if row.baseline and name_tag else f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table><thead>{head}</thead><tbody>{"".join(body)}</tbody></table></div>'


def _header(report: dict) -> str:
    rows = [("eval spec", f"<code>{_e(report.get('eval_spec', '?'))}</code>"),
            ("confidence intervals", _e(report.get("ci_method", "?"))),
            ("baseline", f"<code>{_e(report.get('baseline', '?'))}</code>"),
            ("pipelines", _e(", ".join(str(p["name"]) for p in pipelines(report)) or "none"))]
    meta = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    return f'<header><h1>{_e(report.get("title", "posttrain report"))}</h1><dl class="meta">{meta}</dl></header>'


def _comparison_head(table: Table, report: dict) -> str:
    """Two header rows: each metric over its mean and its delta columns."""
    baseline = report.get("baseline")
    top = ['<th class="name" rowspan="2">pipeline</th>', '<th rowspan="2">seeds</th>']
    sub = []
    for column in table.columns[2:]:
        if column.kind == "mean":
            unit = " (%)" if column.percent else ""
            top.append(f'<th colspan="2"><code>{_e(column.metric)}</code>{unit}</th>')
            sub.append(f"<th>mean [{level(report)} CI]</th>")
        else:
            sub.append(f"<th>\u0394 vs {_e(baseline)}{' (points)' if column.percent else ''}</th>")
    return f'<tr>{"".join(top)}</tr><tr>{"".join(sub)}</tr>'


def _comparison_section(report: dict) -> str:
    if not pipelines(report):
        return "<h2>Comparison</h2><p class=\"note\">No pipelines in this report.</p>"
    table = quality_table(report)
    baseline = report.get("baseline")
    legend = (f'<p class="legend">Values are means over seeds with their {level(report)} interval in brackets '
              f'({_e(report.get("ci_method", "interval method not given"))}). '
              f'\u0394 is the difference to the baseline <code>{_e(baseline)}</code>; '
              f'<b>bold</b> with <span class="mark">{SIGNIFICANT}</span> marks a difference whose '
              f'interval excludes zero. Unmarked differences are within the noise: no winner is implied. '
              f'\u2014 means no value.</p>')
    tag = ' <span class="ci">(baseline)</span>'
    return f"<h2>Comparison</h2>{_table(table, _comparison_head(table, report), tag)}{legend}"


def _cost_section(report: dict) -> str:
    if not pipelines(report):
        return ""
    return (f'<h2>Cost</h2>{_table(cost_table(report))}<p class="note">{_e(COST_NOTE)}</p>'
            f'<p class="note">{_e(THROUGHPUT_NOTE)}</p>')


def _extras_section(report: dict) -> str:
    table = extras_table(report)
    if table is None or not table.rows:
        return ""
    return (f'<h2>Preferences and reply length</h2>{_table(table)}'
            '<p class="note">On held-out preference pairs: how often the model gives the chosen reply a higher '
            'log-probability than the rejected one, and the mean difference of the two '
            f'({level(report)} intervals in brackets). Reply tokens: the mean number of tokens per generated '
            'reply, per task.</p>')


def _img(path: Path, alt: str, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _plots_section(plots: dict[str, Path], level_text: str) -> str:
    available = {k: Path(p) for k, p in (plots or {}).items() if Path(p).is_file()}
    if not available:
        return ""
    parts = ["<h2>Plots</h2>"]
    bars = [k for k in available if k.startswith("bars/")]
    curves = [k for k in available if k.startswith("curves/")]
    other = [k for k in available if k not in bars and k not in curves and k != "cost_quality"]
    if bars:
        parts.append('<h3>Scores</h3><div class="plots">')
        parts += [_img(available[k], k, f"{k[5:]}: mean per pipeline, whiskers = {level_text} interval, "
                       "hatched bar = baseline.") for k in bars]
        parts.append("</div>")
    if "cost_quality" in available:
        parts.append("<h3>Cost vs quality</h3>")
        parts.append(_img(available["cost_quality"], "cost vs quality",
                          f"Train tokens against the first metric (mean, {level_text} interval)."))
    if curves:
        parts.append("<h3>Training curves</h3>")
        parts += [_img(available[k], k, f"Training curves of {k[7:]} stages, one line per stage run.")
                  for k in curves]
    for key in other:
        parts.append(_img(available[key], key, key))
    return "".join(parts)


def _samples_section(report: dict) -> str:
    tables = sample_tables(report)
    if not tables:
        return ""
    baseline = report.get("baseline")
    parts = ['<h2>Samples</h2><p class="note">The same prompts answered by every pipeline.</p>']
    for task, table in tables.items():
        parts.append(f"<h3><code>{_e(task)}</code></h3>")
        for row in table.rows:
            prompt, target, *replies = row.cells
            cards = []
            for column, reply in zip(table.columns[2:], replies):
                klass = "reply baseline" if column.label == baseline else "reply"
                text = f"<pre>{_e(reply.text)}</pre>" if reply.text else '<span class="na">(no reply)</span>'
                cards.append(f'<div class="{klass}"><div class="who">{_e(column.label)}</div>{text}</div>')
            parts.append(
                f'<div class="sample"><div class="label">{_e(row.label)} \u00b7 prompt</div>'
                f'<pre>{_e(prompt.text)}</pre>'
                f'<div class="label">reference</div><pre>{_e(target.text)}</pre>'
                f'<div class="replies">{"".join(cards)}</div></div>')
    return "".join(parts)


def _curation_section(report: dict) -> str:
    """Per curated dataset: rows in -> out, removals by reason and by eval task."""
    table = curation_table(report)
    return f"<h2>Data curation</h2>{_table(table)}" if table else ""


def _notes_section(report: dict) -> str:
    notes = [n for n in report.get("notes") or [] if n]
    if not notes:
        return ""
    return '<h2>Notes</h2><ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"


def render_html(report: dict, plots: dict[str, Path]) -> str:
    """One self-contained HTML page (inline CSS, base64 images) for the report."""
    title = _e(report.get("title", "posttrain report"))
    sections = [
        _header(report),
        _notes_section(report),
        _comparison_section(report),
        _cost_section(report),
        _extras_section(report),
        _plots_section(plots, level(report)),
        _samples_section(report),
        _curation_section(report),
    ]
    body = "\n".join(s for s in sections if s)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{title} \u2014 posttrain report</title>\n<style>{_CSS}</style>\n</head>\n"
            f"<body><main>\n{body}\n</main></body>\n</html>\n")
