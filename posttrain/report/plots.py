"""report.json -> PNG plots: a bar chart per task metric, a cost/quality scatter and the
training curves per stage method.

Deterministic: the same report gives the same bytes. matplotlib is imported inside the
functions, so importing this module stays cheap.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from posttrain.report.cells import columns, is_fraction, level, number, pipelines, stat

DPI = 100
BASELINE_COLOR = "#d95f02"
PIPELINE_COLOR = "#4c72b0"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str) -> str:
    """A file name made only of letters, digits, '_', '-' and '.' (never empty, never hidden)."""
    return _UNSAFE.sub("_", str(text)).strip("._") or "plot"


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
        for column in columns(report):
            task, _, metric = str(column).partition("/")
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
    shown = pipelines(report)
    if not shown:
        return False
    baseline = report.get("baseline")
    scale = 100.0 if is_fraction(report, column) else 1.0
    names = [str(p["name"]) for p in shown]
    fig = _figure(max(4.2, 0.85 * len(names) + 1.6), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    top = 0.0
    for i, pipeline in enumerate(shown):
        mean, lo, hi = stat((pipeline.get("metrics") or {}).get(column))
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
    ax.set_title(f"{column}: mean with {level(report)} interval", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def _cost_quality(report: dict, path: Path) -> bool:
    metrics = columns(report)
    if not metrics:
        return False
    column = metrics[0]
    scale = 100.0 if is_fraction(report, column) else 1.0
    points = []
    for pipeline in pipelines(report):
        tokens = number((pipeline.get("cost") or {}).get("train_tokens"))
        mean, lo, hi = stat((pipeline.get("metrics") or {}).get(column))
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
            x, y = number(point[0]), number(point[1])
            if x is not None and y is not None:
                xs.append(x)
                ys.append(y)
    return xs, ys
