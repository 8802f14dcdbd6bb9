"""report.json -> PNG plots and the self-contained HTML page."""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest

from posttrain.report.cells import SIGNIFICANT as SIGNIFICANT_MARK
from posttrain.report.html import render_html
from posttrain.report.plots import render_plots, safe_name

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COLUMNS = ["skills_exact/exact_match", "skills_mc/acc"]


def _m(mean, lo, hi):
    return {"mean": mean, "lo": lo, "hi": hi}


def _d(mean, lo, hi, significant):
    return {"mean": mean, "lo": lo, "hi": hi, "significant": significant}


def _cost(tokens, steps, wall=0.0, mem=0.0):
    return {"train_tokens": tokens, "optimizer_steps": steps, "forward_passes": steps * 2,
            "backward_passes": steps, "wall_s": wall, "peak_memory_mb": mem}


def make_report() -> dict:
    return {
        "title": "quickstart",
        "eval_spec": "3f9a1c2b7d4e",
        "ci_method": "95% percentile bootstrap over seeds and documents",
        "baseline": "sft",
        "columns": list(COLUMNS),
        "pipelines": [
            {"name": "base", "seeds": 1, "stages": [],
             "metrics": {COLUMNS[0]: _m(0.0, 0.0, 0.0), COLUMNS[1]: _m(0.25, 0.2, 0.3)},
             "delta": {COLUMNS[0]: _d(-0.76, -0.82, -0.70, True), COLUMNS[1]: _d(-0.30, -0.40, -0.20, True)},
             "cost": _cost(0, 0), "reply_tokens": {"skills_exact": 12.5}},
            {"name": "sft", "seeds": 3, "stages": [{"stage": "sft", "method": "sft", "shared_with": ["sft+dpo"]}],
             "metrics": {COLUMNS[0]: _m(0.76, 0.70, 0.82), COLUMNS[1]: _m(0.55, 0.50, 0.60)},
             "delta": {}, "cost": _cost(120_000, 300, 95.0, 2048.0), "reply_tokens": {"skills_exact": 1.2},
             "preferences": {"pref_acc": _m(0.5, 0.4, 0.6), "margin": _m(0.1, 0.0, 0.2)}},
            {"name": "sft+dpo", "seeds": 3,
             "stages": [{"stage": "sft", "method": "sft", "shared_with": ["sft"]},
                        {"stage": "dpo", "method": "dpo", "shared_with": []}],
             "metrics": {COLUMNS[0]: _m(0.787, 0.74, 0.83), COLUMNS[1]: _m(0.62, 0.58, 0.66)},
             "delta": {COLUMNS[0]: _d(0.0271, -0.01, 0.06, False), COLUMNS[1]: _d(0.0734, 0.03, 0.11, True)},
             "cost": _cost(250_000, 500, 4000.0, 3100.0), "reply_tokens": {"skills_exact": 1.1},
             "preferences": {"pref_acc": _m(0.8, 0.7, 0.9), "margin": _m(1.5, 1.1, 1.9)}},
            {"name": "orpo", "seeds": 3, "stages": [{"stage": "orpo", "method": "orpo", "shared_with": []}],
             # missing column, missing delta entry, no reply_tokens, no cost fields
             "metrics": {COLUMNS[1]: _m(0.51, 0.45, 0.57)},
             "delta": {COLUMNS[1]: _d(-0.04, -0.09, 0.01, False)},
             "cost": {"train_tokens": 130_000}},
        ],
        "curves": [
            {"label": f"{stage} (seed {seed})", "stage": stage, "method": stage, "seed": seed,
             "series": {"loss": [[10, 2.1 - 0.1 * seed], [20, 1.7], [30, 1.5]],
                        **({"rewards/accuracies": [[10, 0.6], [20, 0.7]],
                            "rewards/margins": [[10, 0.1], [20, 0.4]]} if stage != "sft" else {})}}
            for stage in ("sft", "dpo", "orpo") for seed in (0, 1)
        ],
        "samples": {"skills_exact": [
            {"doc_id": 0, "prompt": "What is 2+3? <script>alert('x')</script>", "target": "5",
             "replies": {"base": "zz", "sft": "5", "sft+dpo": "5 & more"}},
        ]},
        "curation": {"instructions": {"rows_in": 10, "rows_out": 7, "removed": {"exact duplicate": 3},
                                      "contaminated_by_task": {}, "steps": ["dedup"]}},
        "notes": ["a note with <b>markup</b>"],
    }


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    report = make_report()
    plots = render_plots(report, tmp_path_factory.mktemp("plots"))
    return report, plots, render_html(report, plots)


def test_plots_are_pngs_with_safe_names(rendered):
    _, plots, _ = rendered
    names = {path.name for path in plots.values()}
    assert {"bars_skills_exact_exact_match.png", "bars_skills_mc_acc.png", "cost_quality.png",
            "curves_sft.png", "curves_dpo.png", "curves_orpo.png"} <= names
    for path in plots.values():
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", path.name)
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_plots_are_deterministic(tmp_path):
    report = make_report()
    first = {k: p.read_bytes() for k, p in render_plots(report, tmp_path / "a").items()}
    second = {k: p.read_bytes() for k, p in render_plots(copy.deepcopy(report), tmp_path / "b").items()}
    assert first == second


def test_safe_name():
    assert safe_name("bars_sft+dpo/x y") == "bars_sft_dpo_x_y"
    assert safe_name("../..") == "plot"


def test_html_content(rendered):
    report, plots, page = rendered
    assert page.startswith("<!DOCTYPE html>")
    for pipeline in report["pipelines"]:
        assert pipeline["name"] in page
    assert page.count("data:image/png;base64,") == len(plots)
    assert "3f9a1c2b7d4e" in page
    assert "percentile bootstrap" in page
    assert "(shared with sft)" in page  # sft+dpo reuses the sft stage
    assert "76.0" in page  # sft exact_match mean in percent


def test_html_is_self_contained(rendered):
    _, _, page = rendered
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    assert "<link" not in page and "@import" not in page and "<script" not in page


def test_html_escapes_text(rendered):
    _, _, page = rendered
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "5 &amp; more" in page
    assert "<b>markup</b>" not in page


def _delta_cell(page: str, value: str) -> str:
    match = re.search(r"<td[^>]*>" + re.escape(value) + r"[^<]*(?:<span[^>]*>[^<]*</span>)?\s*</td>", page)
    assert match, value
    return match.group(0)


def test_only_significant_deltas_are_marked(rendered):
    _, _, page = rendered
    significant = _delta_cell(page, "+7.3")  # sft+dpo on skills_mc/acc: significant
    assert SIGNIFICANT_MARK in significant and 'class="delta sig' in significant
    noise = _delta_cell(page, "+2.7")  # sft+dpo on exact_match: not significant
    assert SIGNIFICANT_MARK not in noise and 'class="delta"' in noise
    noise_negative = _delta_cell(page, "\u22124.0")  # orpo on acc: not significant
    assert SIGNIFICANT_MARK not in noise_negative and 'class="delta"' in noise_negative
    assert "legend" in page


def test_missing_values_do_not_crash(tmp_path):
    report = make_report()
    report["pipelines"].append({"name": "empty"})  # nothing but a name
    report["pipelines"][0]["metrics"][COLUMNS[0]] = {"mean": None}
    del report["curves"][0]["series"]
    report["samples"]["skills_exact"][0]["replies"]["orpo"] = None
    plots = render_plots(report, tmp_path)
    page = render_html(report, plots)
    assert "empty" in page and "(no reply)" in page
    assert render_html(report, plots) == page


def test_minimal_report(tmp_path):
    report = {"title": "t", "pipelines": []}
    plots = render_plots(report, tmp_path)
    assert plots == {}
    assert "<h1>t</h1>" in render_html(report, plots)


def test_import_is_cheap():
    code = "import sys, posttrain.report.html, posttrain.report.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_terminal_table_shows_brackets_as_written():
    """rich reads "[...]" as markup: a filter's name or a sweep's pipeline name must survive."""
    from rich.console import Console

    from posttrain.report import terminal_table

    report = make_report()
    column = "skills/exact_match[concise]"
    report["columns"] = [column]
    report["title"] = "sweep[a]"
    for p in report["pipelines"]:
        p["metrics"] = {column: _m(0.5, 0.4, 0.6)}
        p["delta"] = {}
    report["pipelines"][2]["name"] = "dpo[beta=0.2]"
    console = Console(width=200, record=True)
    console.print(terminal_table(report))
    text = console.export_text()
    assert "skills/exact_match[concise]" in text and "Δ skills/exact_match[concise]" in text
    assert "dpo[beta=0.2]" in text and "sweep[a]" in text and "50.0 [40.0, 60.0]" in text


def test_the_recipes_confidence_and_resamples_reach_every_label(tmp_path):
    """report.confidence / report.resamples once changed the intervals but not the text."""
    from posttrain.report import markdown
    from posttrain.stats import ci_method_text

    report = make_report()
    report.update(confidence=0.9, resamples=500, ci_method=ci_method_text(0.9, 500))
    html = render_html(report, render_plots(report, tmp_path))
    report["pipelines"][3].update(cost=_cost(130_000, 300), reply_tokens={})   # Markdown wants every field
    text = markdown(report)
    for page in (html, text):
        assert "95%" not in page and "2000" not in page
        assert "90% percentile bootstraps (500 seeded resamples)" in page
    assert "mean [90% CI]" in html and "their 90% interval" in html and "whiskers = 90% interval" in html
    assert "· 90% intervals." in text


def _html_tables(page: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every <table> of the page as (header texts of its last header row, body rows of cell texts)."""
    import html as html_module

    def text(fragment: str) -> str:
        plain = html_module.unescape(re.sub(r"<[^>]+>", "", fragment)).replace("\u2212", "-")
        return plain.removesuffix(" (baseline)")

    out = []
    for head, body in re.findall(r"<thead>(.*?)</thead><tbody>(.*?)</tbody>", page):
        header = [text(c) for c in re.findall(r"<th[^>]*>(.*?)</th>", re.findall(r"<tr>(.*?)</tr>", head)[-1])]
        rows = [[text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
                for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body)]
        out.append((header, rows))
    return out


def _markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    out = []
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        if lines:
            cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
            out.append((cells[0], cells[2:]))
    return out


def test_every_cell_reads_the_same_in_markdown_html_and_the_terminal(rendered):
    """The tables are built once: each cell's text is the same in every rendering (HTML
    shows an empty number as a dash, the baseline's own delta as "baseline")."""
    from rich.console import Console

    from posttrain.report import markdown, terminal_table

    report, _, page = rendered
    markdown_tables = _markdown_tables(markdown(report))
    html_tables = _html_tables(page)
    assert len(html_tables) == 4 and len(markdown_tables) == 5   # + the samples, which HTML shows as cards
    for (md_header, md_rows), (html_header, html_rows) in zip(markdown_tables[:4], html_tables):
        assert len(md_rows) == len(html_rows) == (len(report["pipelines"]) if md_header[0] == "pipeline" else 1)
        for md_row, html_row in zip(md_rows, html_rows):
            assert len(md_row) == len(html_row)
            for md_cell, html_cell in zip(md_row, html_row):
                assert html_cell == md_cell or (md_cell == "" and html_cell in ("\u2014", "baseline")), md_row
        if md_header[0] != "pipeline" or "seeds" not in md_header:  # the comparison's header is grouped
            assert md_header == html_header
    console = Console(width=400, record=True)
    console.print(terminal_table(report))
    terminal = console.export_text()
    for row in markdown_tables[0][1]:
        assert all(cell in terminal for cell in row)


def test_a_metric_that_is_not_a_fraction_is_shown_as_it_is():
    """Markdown once showed every metric in percent: a perplexity of 12.3 read "1230.0"."""
    from posttrain.report import markdown

    report = make_report()
    column = "wiki/perplexity"
    report["columns"].append(column)
    report["pipelines"][1]["metrics"][column] = _m(12.34, 11.0, 13.9)
    report["pipelines"][2]["metrics"][column] = _m(10.5, 9.75, 11.2)
    report["pipelines"][2]["delta"][column] = _d(-1.84, -2.5, -1.1, True)
    for p in report["pipelines"]:
        p.setdefault("reply_tokens", {})
    text = markdown(report)
    assert "| 12.3 [11, 13.9] |" in text and "| -1.84 [-2.5, -1.1] ✱ |" in text and "1234" not in text
    page = render_html(report, {})
    assert "12.3 <span" in page and "<code>wiki/perplexity</code></th>" in page
