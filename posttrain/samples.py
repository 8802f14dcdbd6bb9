"""Per-sample records of an evaluation: lm-eval's samples files and our preference records.

Pure (json only): the report's statistics are computed from these, so a report
can be regenerated from the run directory alone.
"""

from __future__ import annotations

from pathlib import Path

PREFERENCE_FILE = "preferences.jsonl"


def samples_file(eval_dir: Path, task: str) -> Path | None:
    """lm-eval's `samples_<task>_<date>.jsonl` in `eval_dir` (the newest, if several)."""
    files = sorted(Path(eval_dir).glob(f"samples_{task}_*.jsonl"))
    return files[-1] if files else None


def read_jsonl(path: Path) -> list[dict]:
    from posttrain.records import read_jsonl as read_records

    return read_records(path)


def split_metric(metric: str) -> tuple[str, str]:
    """`exact_match[strict-match]` -> (`exact_match`, `strict-match`); a plain metric's
    filter is lm-eval's `none` (evaluate names a filtered metric `name[filter]`)."""
    name, _, rest = metric.partition("[")
    return name, (rest[:-1] if rest.endswith("]") else "none")


def item_scores(path: Path, metric: str) -> dict[int, float]:
    """{doc_id: score} of one metric from a per-sample file (lm-eval's or ours).

    A task with several filters (gsm8k's strict-match and flexible-extract, the
    builtin skills' correct and concise) has one record per item and filter; only
    the metric's own filter counts.
    """
    key, wanted = split_metric(metric)
    scores = {}
    for record in read_jsonl(path):
        if record.get("filter", wanted) != wanted:
            continue
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scores[int(record["doc_id"])] = float(value)
        elif isinstance(value, bool):
            scores[int(record["doc_id"])] = float(value)
    return scores


def generated_replies(path: Path) -> dict[int, dict]:
    """{doc_id: {prompt, target, reply}} for a generation task's per-sample file.

    The reply is the model's own text (before any filter): with several filters an
    item has several records, and each would show a different extraction of it.
    """
    out = {}
    for record in read_jsonl(path):
        if int(record["doc_id"]) in out:
            continue
        raw = record.get("resps") or [[None]]
        reply = raw[0][0] if isinstance(raw[0], list) and raw[0] else None
        if not isinstance(reply, str):
            reply = record.get("filtered_resps", [None])[0]
        if not isinstance(reply, str):
            return {}  # not a generation task (loglikelihood responses are pairs)
        doc = record.get("doc", {})
        out[int(record["doc_id"])] = {
            "prompt": doc.get("prompt") or record["arguments"]["gen_args_0"]["arg_0"],
            "target": display_target(record.get("target")), "reply": reply}
    return out


def display_target(target):
    """lm-eval writes several acceptable targets as a list's repr ("['5', 'It has 5
    letters.']"); show them as "5 / It has 5 letters."."""
    import ast

    value = target
    if isinstance(target, str) and target.startswith("[") and target.endswith("]"):
        try:
            value = ast.literal_eval(target)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return target
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return " / ".join(value)
    return target
