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


def base_metric(metric: str) -> str:
    """`exact_match[strip]` -> `exact_match`: the key lm-eval uses in a sample record."""
    return metric.split("[", 1)[0]


def item_scores(path: Path, metric: str) -> dict[int, float]:
    """{doc_id: score} of one metric from a per-sample file (lm-eval's or ours)."""
    key = base_metric(metric)
    scores = {}
    for record in read_jsonl(path):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scores[int(record["doc_id"])] = float(value)
        elif isinstance(value, bool):
            scores[int(record["doc_id"])] = float(value)
    return scores


def generated_replies(path: Path) -> dict[int, dict]:
    """{doc_id: {prompt, target, reply}} for a generation task's per-sample file."""
    out = {}
    for record in read_jsonl(path):
        reply = record.get("filtered_resps", [None])[0]
        if not isinstance(reply, str):
            return {}  # not a generation task (loglikelihood responses are pairs)
        doc = record.get("doc", {})
        out[int(record["doc_id"])] = {
            "prompt": doc.get("prompt") or record["arguments"]["gen_args_0"]["arg_0"],
            "target": record.get("target"), "reply": reply}
    return out
