"""report.json -> plots (PNG) and one self-contained HTML page.

`render_plots(report, out_dir)` draws bar charts per task metric, training curves per
stage method and a cost/quality scatter; `render_html(report, plots)` embeds them
(base64 data URIs) in a single page with the comparison, cost, preference, reply
length and sample tables. Both are deterministic: the same report gives the same
bytes. matplotlib is imported inside the functions so importing this module stays
cheap.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

DPI = 100
SIGNIFICANT_MARK = "\u2731"  # ✱
BASELINE_COLOR = "#d95f02"
PIPELINE_COLOR = "#4c72b0"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_COST_FIELDS = (
    ("train_tokens", "train tokens"),
    ("optimizer_steps", "optimizer steps"),
    ("forward_passes", "forward passes"),
    ("backward_passes", "backward passes"),
    ("wall_s", "wall time"),
    ("peak_memory_mb", "peak memory"),
)
DEFAULT_COST_NOTE = (
    "Cost of producing each pipeline's model, summed over its stages. A stage marked "
    "\u201cshared with X\u201d was trained once and reused: its cost also appears in X's row.")


# ---------------------------------------------------------------- helpers

def safe_name(text: str) -> str:
    """A file name made only of letters, digits, '_', '-' and '.' (never empty, never hidden)."""
    name = _UNSAFE.sub("_", str(text)).strip("._") or "plot"
    return name


def _num(value) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _stat(entry) -> tuple[float | None, float | None, float | None]:
    if not isinstance(entry, dict):
        return None, None, None
    return _num(entry.get("mean")), _num(entry.get("lo")), _num(entry.get("hi"))


def _pipelines(report: dict) -> list[dict]:
    return [p for p in report.get("pipelines") or [] if isinstance(p, dict) and "name" in p]


def _columns(report: dict) -> list[str]:
    columns = list(report.get("columns") or [])
    for pipeline in _pipelines(report):  # tolerate metrics not announced in "columns"
        for column in pipeline.get("metrics") or {}:
            if column not in columns:
                columns.append(column)
    return columns


def _is_fraction_column(report: dict, column: str) -> bool:
    """True when every observed value of the column lies in [0, 1]: shown in percent."""
    seen = False
    for pipeline in _pipelines(report):
        for value in _stat((pipeline.get("metrics") or {}).get(column)):
            if value is None:
                continue
            seen = True
            if not 0.0 <= value <= 1.0:
                return False
    return seen


def _level(report: dict) -> str:
    """The intervals' confidence as written in labels: 0.95 -> "95%", 0.975 -> "97.5%".
    Reports written before `confidence` was recorded used the default, 95%."""
    from posttrain.stats import DEFAULT_CONFIDENCE, level_text

    value = _num(report.get("confidence"))
    return level_text(DEFAULT_CONFIDENCE if value is None else value)


def _split_column(column: str) -> tuple[str, str]:
    task, _, metric = str(column).partition("/")
    return task, metric


# ---------------------------------------------------------------- plots

def render_plots(report: dict, out_dir: Path) -> dict[str, Path]:
    """Write the report's PNGs under out_dir; return {plot key: path}.

    Keys: "bars/<column>" per task metric, "cost_quality", "curves/<method>" per stage
    method, in that order. The same report gives byte-identical files.
    """
    import matplotlib.style

    from posttrain.artifacts import Area

    out_dir = Path(out_dir)
    Area(out_dir.parent).mkdir(out_dir)
    plots: dict[str, Path] = {}
    used: set[str] = set()

    def target(stem: str) -> Path:
        name, n = f"{safe_name(stem)}.png", 2
        while name in used:
            name, n = f"{safe_name(stem)}-{n}.png", n + 1
        used.add(name)
        return out_dir / name

    # The "default" style makes the pixels independent of the user's matplotlibrc.
    with matplotlib.style.context("default"):
        for column in _columns(report):
            task, metric = _split_column(column)
            path = target(f"bars_{task}_{metric}" if metric else f"bars_{task}")
            if _bars(report, column, path):
                plots[f"bars/{column}"] = path
        path = target("cost_quality")
        if _cost_quality(report, path):
            plots["cost_quality"] = path
        for method, curves in _curves_by_method(report).items():
            path = target(f"curves_{method}")
            if _curves(method, curves, path):
                plots[f"curves/{method}"] = path
    return plots


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    """Render in memory, then write atomically: a full disk never leaves a 0-byte plot.
    The guard's root is the report folder, so a link planted at plots/ is not followed."""
    import io

    from posttrain.artifacts import Area

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    Area(path.parent.parent).write_bytes(path, buffer.getvalue())


def _bars(report: dict, column: str, path: Path) -> bool:
    pipelines = _pipelines(report)
    if not pipelines:
        return False
    baseline = report.get("baseline")
    scale = 100.0 if _is_fraction_column(report, column) else 1.0
    names = [str(p["name"]) for p in pipelines]
    fig = _figure(max(4.2, 0.85 * len(names) + 1.6), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    top = 0.0
    for i, pipeline in enumerate(pipelines):
        mean, lo, hi = _stat((pipeline.get("metrics") or {}).get(column))
        is_base = pipeline["name"] == baseline
        if mean is None:
            ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=9, color="#777777")
            continue
        mean *= scale
        lo = mean if lo is None else lo * scale
        hi = mean if hi is None else hi * scale
        ax.bar(i, mean, width=0.65, color=BASELINE_COLOR if is_base else PIPELINE_COLOR,
               hatch="//" if is_base else None, edgecolor="black" if is_base else "none",
               linewidth=0.8, zorder=2)
        ax.errorbar(i, mean, yerr=[[max(mean - lo, 0.0)], [max(hi - mean, 0.0)]], fmt="none",
                    ecolor="black", elinewidth=1.2, capsize=5, zorder=3)
        label_y = max(hi, mean)
        top = max(top, label_y)
        ax.annotate(f"{mean:.1f}" if scale != 1.0 else f"{mean:.3g}", (i, label_y),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\n(baseline)" if n == baseline else n for n in names], fontsize=9)
    for tick, name in zip(ax.get_xticklabels(), names):
        if name == baseline:
            tick.set_fontweight("bold")
    ax.set_xlim(-0.6, len(names) - 0.4)
    if scale != 1.0:
        ax.set_ylim(0, max(100.0, top * 1.08) if top > 90 else max(top * 1.15, 1.0))
        ax.set_ylabel(f"{column} (%)")
    else:
        ax.set_ylabel(column)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.grid(axis="y", color="#dddddd", zorder=0)
    ax.set_axisbelow(True)
    ax.set_title(f"{column}: mean with {_level(report)} interval", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def _cost_quality(report: dict, path: Path) -> bool:
    columns = _columns(report)
    if not columns:
        return False
    column = columns[0]
    scale = 100.0 if _is_fraction_column(report, column) else 1.0
    points = []
    for pipeline in _pipelines(report):
        tokens = _num((pipeline.get("cost") or {}).get("train_tokens"))
        mean, lo, hi = _stat((pipeline.get("metrics") or {}).get(column))
        if tokens is None or mean is None:
            continue
        mean *= scale
        lo = mean if lo is None else lo * scale
        hi = mean if hi is None else hi * scale
        points.append((str(pipeline["name"]), tokens, mean, max(mean - lo, 0.0), max(hi - mean, 0.0)))
    if not points:
        return False
    baseline = report.get("baseline")
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for index, (name, tokens, mean, below, above) in enumerate(points):
        is_base = name == baseline
        ax.errorbar(tokens, mean, yerr=[[below], [above]], fmt="D" if is_base else "o",
                    color=BASELINE_COLOR if is_base else PIPELINE_COLOR, ecolor="#555555",
                    elinewidth=1, capsize=4, markersize=7, zorder=3)
        ax.annotate(name + (" (baseline)" if is_base else ""), (tokens, mean), textcoords="offset points",
                    xytext=(6, 5 if index % 2 == 0 else -12), fontsize=8)
    positive = [p[1] for p in points if p[1] > 0]
    if positive and max(positive) / min(positive) > 50:
        if len(positive) < len(points):  # zero-token pipelines (the base model): linear near 0
            ax.set_xscale("symlog", linthresh=min(positive))
        else:
            ax.set_xscale("log")
    from matplotlib.ticker import EngFormatter

    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel("train tokens")
    ax.set_ylabel(f"{column} (%)" if scale != 1.0 else column)
    ax.grid(color="#dddddd", zorder=0)
    ax.margins(x=0.15, y=0.15)
    ax.set_title(f"cost vs quality ({column})", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def _curves_by_method(report: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for curve in report.get("curves") or []:
        if not isinstance(curve, dict) or not isinstance(curve.get("series"), dict):
            continue
        method = str(curve.get("method") or curve.get("stage") or "unknown")
        groups.setdefault(method, []).append(curve)
    return groups


def _curves(method: str, curves: list[dict], path: Path) -> bool:
    keys: list[str] = []
    for curve in curves:
        for key, points in curve["series"].items():
            if key not in keys and _xy(points)[0]:
                keys.append(key)
    if not keys:
        return False
    keys.sort(key=lambda k: (k != "loss", k))  # loss first, then alphabetical
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = _figure(4.2 * ncols, 3.0 * nrows + 0.6)
    for index, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        for curve in curves:
            xs, ys = _xy(curve["series"].get(key))
            if xs:
                ax.plot(xs, ys, label=str(curve.get("label", "")), linewidth=1.4,
                        marker="o" if len(xs) < 3 else None, markersize=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(color="#eeeeee")
        if index == 0:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"training curves: {method}", fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    return True


def _xy(points) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for point in points or []:
        if isinstance(point, (list, tuple)) and len(point) == 2:
            x, y = _num(point[0]), _num(point[1])
            if x is not None and y is not None:
                xs.append(x)
                ys.append(y)
    return xs, ys


# ---------------------------------------------------------------- HTML

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
ol.stages{margin:0;padding-left:18px;text-align:left}
.shared{color:#777;font-size:12px}
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


def _fmt(value: float | None, scale: float, signed: bool = False) -> str:
    if value is None:
        return "?"
    value *= scale
    if scale != 1.0:
        text = f"{value:+.1f}" if signed else f"{value:.1f}"
    else:
        text = f"{value:+.3g}" if signed else f"{value:.3g}"
    return text.replace("-", "\u2212")


def _interval_cell(entry, scale: float) -> str:
    mean, lo, hi = _stat(entry)
    if mean is None:
        return '<td class="na">\u2014</td>'
    ci = ""
    if lo is not None or hi is not None:
        ci = f' <span class="ci">[{_fmt(lo, scale)}, {_fmt(hi, scale)}]</span>'
    return f"<td>{_e(_fmt(mean, scale))}{ci}</td>"


def _delta_cell(entry, scale: float) -> str:
    mean, lo, hi = _stat(entry)
    if mean is None:
        return '<td class="na">\u2014</td>'
    text = _e(_fmt(mean, scale, signed=True))
    ci = ""
    if lo is not None or hi is not None:
        ci = f" [{_e(_fmt(lo, scale, signed=True))}, {_e(_fmt(hi, scale, signed=True))}]"
    if isinstance(entry, dict) and entry.get("significant") is True:
        neg = " neg" if mean < 0 else ""
        return (f'<td class="delta sig{neg}" title="significant">{text}{ci} '
                f'<span class="mark">{SIGNIFICANT_MARK}</span></td>')
    return f'<td class="delta" title="not significant">{text}{ci}</td>'


def _header(report: dict) -> str:
    rows = [("eval spec", f"<code>{_e(report.get('eval_spec', '?'))}</code>"),
            ("confidence intervals", _e(report.get("ci_method", "?"))),
            ("baseline", f"<code>{_e(report.get('baseline', '?'))}</code>"),
            ("pipelines", _e(", ".join(str(p["name"]) for p in _pipelines(report)) or "none"))]
    meta = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    return f'<header><h1>{_e(report.get("title", "posttrain report"))}</h1><dl class="meta">{meta}</dl></header>'


def _comparison_table(report: dict) -> str:
    columns = _columns(report)
    pipelines = _pipelines(report)
    baseline = report.get("baseline")
    if not pipelines:
        return "<h2>Comparison</h2><p class=\"note\">No pipelines in this report.</p>"
    scales = {c: 100.0 if _is_fraction_column(report, c) else 1.0 for c in columns}
    top = ['<th class="name" rowspan="2">pipeline</th>', '<th rowspan="2">seeds</th>']
    sub = []
    for column in columns:
        unit = " (%)" if scales[column] != 1.0 else ""
        top.append(f'<th colspan="2"><code>{_e(column)}</code>{unit}</th>')
        delta_unit = " (points)" if scales[column] != 1.0 else ""
        sub.append(f"<th>mean [{_level(report)} CI]</th><th>\u0394 vs {_e(baseline)}{delta_unit}</th>")
    body = []
    for pipeline in pipelines:
        name = pipeline["name"]
        is_base = name == baseline
        tag = ' <span class="ci">(baseline)</span>' if is_base else ""
        cells = [f'<td class="name">{_e(name)}{tag}</td>',
                 f"<td>{_e(pipeline.get('seeds', '?'))}</td>"]
        for column in columns:
            cells.append(_interval_cell((pipeline.get("metrics") or {}).get(column), scales[column]))
            if is_base:
                cells.append('<td class="na">baseline</td>')
            else:
                cells.append(_delta_cell((pipeline.get("delta") or {}).get(column), scales[column]))
        row_class = ' class="baseline"' if is_base else ""
        body.append(f'<tr{row_class}>{"".join(cells)}</tr>')
    legend = (f'<p class="legend">Values are means over seeds with their {_level(report)} interval in brackets '
              f'({_e(report.get("ci_method", "interval method not given"))}). '
              f'\u0394 is the difference to the baseline <code>{_e(baseline)}</code>; '
              f'<b>bold</b> with <span class="mark">{SIGNIFICANT_MARK}</span> marks a difference whose '
              f'interval excludes zero. Unmarked differences are within the noise: no winner is implied. '
              f'\u2014 means no value.</p>')
    return (f'<h2>Comparison</h2><div class="scroll"><table><thead><tr>{"".join(top)}</tr>'
            f'<tr>{"".join(sub)}</tr></thead><tbody>{"".join(body)}</tbody></table></div>{legend}')


def _fmt_cost(key: str, value) -> str:
    value = _num(value)
    if value is None:
        return "\u2014"
    if key == "wall_s":
        if value >= 3600:
            return f"{int(value // 3600)}h {int(value % 3600 // 60):02d}m"
        if value >= 60:
            return f"{int(value // 60)}m {int(value % 60):02d}s"
        return f"{value:.1f} s"
    if key == "peak_memory_mb":
        return f"{value / 1024:,.2f} GB" if value >= 1024 else f"{value:,.0f} MB"
    return f"{value:,.0f}"


def _stages_cell(stages) -> str:
    stages = [s for s in stages or [] if isinstance(s, dict)]
    if not stages:
        return '<td class="text"><span class="na">none (untrained)</span></td>'
    items = []
    for stage in stages:
        name = str(stage.get("stage", "?"))
        method = str(stage.get("method", ""))
        text = _e(name) + (f' <span class="ci">({_e(method)})</span>' if method and method != name else "")
        shared = [str(s) for s in stage.get("shared_with") or []]
        if shared:
            text += f' <span class="shared">(shared with {_e(", ".join(shared))})</span>'
        items.append(f"<li>{text}</li>")
    count = f"{len(stages)} stage{'s' if len(stages) != 1 else ''}"
    return f'<td class="text">{count}<ol class="stages">{"".join(items)}</ol></td>'


def _cost_table(report: dict) -> str:
    pipelines = _pipelines(report)
    if not pipelines:
        return ""
    head = '<th class="name">pipeline</th><th>stages</th>' + "".join(f"<th>{_e(label)}</th>" for _, label in _COST_FIELDS)
    body = []
    for pipeline in pipelines:
        cost = pipeline.get("cost") or {}
        cells = [f'<td class="name">{_e(pipeline["name"])}</td>', _stages_cell(pipeline.get("stages"))]
        cells += [f"<td>{_e(_fmt_cost(key, cost.get(key)))}</td>" for key, _ in _COST_FIELDS]
        body.append(f"<tr>{''.join(cells)}</tr>")
    note = _e(report.get("cost_note") or DEFAULT_COST_NOTE)
    return (f'<h2>Cost</h2><div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div><p class="note">{note}</p>')


def _preference_table(report: dict) -> str:
    pipelines = [p for p in _pipelines(report) if isinstance(p.get("preferences"), dict) and p["preferences"]]
    if not pipelines:
        return ""
    keys: list[str] = []
    for pipeline in pipelines:
        keys += [k for k in pipeline["preferences"] if k not in keys]
    keys.sort(key=lambda k: ({"pref_acc": 0, "margin": 1}.get(k, 2), k))
    scales = {}
    for key in keys:
        values = [v for p in pipelines for v in _stat(p["preferences"].get(key)) if v is not None]
        scales[key] = 100.0 if key.endswith("acc") and values and all(0 <= v <= 1 for v in values) else 1.0
    head = '<th class="name">pipeline</th>' + "".join(
        f"<th><code>{_e(k)}</code>{' (%)' if scales[k] != 1.0 else ''}</th>" for k in keys)
    body = []
    for pipeline in pipelines:
        cells = [f'<td class="name">{_e(pipeline["name"])}</td>']
        cells += [_interval_cell(pipeline["preferences"].get(k), scales[k]) for k in keys]
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<h2>Preference metrics</h2><div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>'
            '<p class="note">On held-out preference pairs: <code>pref_acc</code> is how often the model gives '
            'the chosen reply a higher likelihood than the rejected one; <code>margin</code> is the mean '
            f'difference of the two. {_level(report)} intervals in brackets.</p>')


def _reply_length_table(report: dict) -> str:
    pipelines = _pipelines(report)
    tasks: list[str] = []
    for column in _columns(report):
        task = _split_column(column)[0]
        if task not in tasks:
            tasks.append(task)
    present: list[str] = []
    for pipeline in pipelines:
        present += [t for t in (pipeline.get("reply_tokens") or {}) if t not in present]
    tasks = [t for t in tasks if t in present] + [t for t in present if t not in tasks]
    if not tasks:
        return ""
    head = '<th class="name">pipeline</th>' + "".join(f"<th><code>{_e(t)}</code></th>" for t in tasks)
    body = []
    for pipeline in pipelines:
        lengths = pipeline.get("reply_tokens") or {}
        cells = [f'<td class="name">{_e(pipeline["name"])}</td>']
        for task in tasks:
            value = _num(lengths.get(task))
            cells.append('<td class="na">\u2014</td>' if value is None else f"<td>{value:.1f}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<h2>Mean reply length</h2><div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>'
            '<p class="note">Mean number of tokens per generated reply, per task.</p>')


def _img(path: Path, alt: str, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _plots_section(plots: dict[str, Path], level: str = "95%") -> str:
    available = {k: Path(p) for k, p in (plots or {}).items() if Path(p).is_file()}
    if not available:
        return ""
    parts = ["<h2>Plots</h2>"]
    bars = [k for k in available if k.startswith("bars/")]
    curves = [k for k in available if k.startswith("curves/")]
    other = [k for k in available if k not in bars and k not in curves and k != "cost_quality"]
    if bars:
        parts.append('<h3>Scores</h3><div class="plots">')
        parts += [_img(available[k], k, f"{k[5:]}: mean per pipeline, whiskers = {level} interval, "
                       "hatched bar = baseline.") for k in bars]
        parts.append("</div>")
    if "cost_quality" in available:
        parts.append("<h3>Cost vs quality</h3>")
        parts.append(_img(available["cost_quality"], "cost vs quality",
                          f"Train tokens against the first metric (mean, {level} interval)."))
    if curves:
        parts.append("<h3>Training curves</h3>")
        parts += [_img(available[k], k, f"Training curves of {k[7:]} stages, one line per stage run.")
                  for k in curves]
    for key in other:
        parts.append(_img(available[key], key, key))
    return "".join(parts)


def _samples_section(report: dict) -> str:
    samples = report.get("samples") or {}
    if not isinstance(samples, dict) or not samples:
        return ""
    baseline = report.get("baseline")
    order = [str(p["name"]) for p in _pipelines(report)]
    parts = ['<h2>Samples</h2><p class="note">The same prompts answered by every pipeline.</p>']
    for task, items in samples.items():
        parts.append(f"<h3><code>{_e(task)}</code></h3>")
        for item in items or []:
            if not isinstance(item, dict):
                continue
            replies = item.get("replies") or {}
            names = [n for n in order if n in replies] + [n for n in replies if n not in order]
            cards = []
            for name in names:
                reply = replies.get(name)
                klass = "reply baseline" if name == baseline else "reply"
                text = f"<pre>{_e(reply)}</pre>" if reply is not None else '<span class="na">(no reply)</span>'
                cards.append(f'<div class="{klass}"><div class="who">{_e(name)}</div>{text}</div>')
            parts.append(
                f'<div class="sample"><div class="label">doc {_e(item.get("doc_id", "?"))} \u00b7 prompt</div>'
                f'<pre>{_e(item.get("prompt", ""))}</pre>'
                f'<div class="label">reference</div><pre>{_e(item.get("target", ""))}</pre>'
                f'<div class="replies">{"".join(cards)}</div></div>')
    return "".join(parts)


def _curation_section(report: dict) -> str:
    """Per curated dataset: rows in -> out, removals by reason and by eval task."""
    from posttrain.report import curation_table

    if not report.get("curation"):
        return ""
    header, rows = curation_table(report)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="text">{_e(c)}</td>' for c in row) + "</tr>" for row in rows)
    return (f'<h2>Data curation</h2><div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


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
        _comparison_table(report),
        _cost_table(report),
        _preference_table(report),
        _reply_length_table(report),
        _plots_section(plots, _level(report)),
        _samples_section(report),
        _curation_section(report),
    ]
    body = "\n".join(s for s in sections if s)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{title} \u2014 posttrain report</title>\n<style>{_CSS}</style>\n</head>\n"
            f"<body><main>\n{body}\n</main></body>\n</html>\n")


def write_html_report(report: dict, out_dir: Path, plots_dir: Path | None = None) -> Path:
    """Convenience: render the plots (into out_dir/plots) and write out_dir/report.html."""
    out_dir = Path(out_dir)
    plots = render_plots(report, plots_dir or out_dir / "plots")
    path = out_dir / "report.html"
    from posttrain.artifacts import Area

    Area(out_dir).write_text(path, render_html(report, plots))
    return path
