"""Per skill and per form: what each pipeline of a run answered on the `skills` task.

    python evals/skills_breakdown.py runs/quickstart

Reads the run's results.jsonl and lm-eval's per-sample files (nothing is
re-evaluated) and sorts every greedy reply into: concise and right, wordy and
right, concise but wrong, wordy but wrong, anything else. Percentages are over
the items of each skill, pooled over seeds.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

KINDS = ("concise right", "wordy right", "concise wrong", "wordy wrong", "other")


def kind(reply: str, doc: dict) -> str:
    reply = reply.strip()
    if re.fullmatch(r"\d+", reply):
        return "concise right" if reply == doc["answer"] else "concise wrong"
    template = re.escape(doc["wordy"]).replace(re.escape(doc["answer"]), r"(\d+)", 1)
    match = re.fullmatch(template, reply)
    if match:
        return "wordy right" if match.group(1) == doc["answer"] else "wordy wrong"
    return "other"


def breakdown(run_dir: Path) -> dict[str, dict[str, Counter]]:
    """{pipeline: {skill: Counter(kind)}} from the run's `skills` samples."""
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    files = {(r["pipeline"], r["seed"]): r["samples"] for r in rows if r["task"] == "skills" and r.get("samples")}
    out: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for (pipeline, _seed), relative in files.items():
        seen = set()
        for line in (run_dir / relative).read_text().splitlines():
            record = json.loads(line)
            if record["doc_id"] in seen:       # one record per filter; the reply is the same
                continue
            seen.add(record["doc_id"])
            doc = record["doc"]
            out[pipeline][doc["skill"]][kind(record["resps"][0][0], doc)] += 1
    return out


def main(run_dir: str) -> None:
    table = breakdown(Path(run_dir))
    print("| pipeline | skill | n | " + " | ".join(KINDS) + " |")
    print("|---|---|---|" + "---|" * len(KINDS))
    for pipeline, skills in table.items():
        for skill, counts in sorted(skills.items()) + [("all", sum(skills.values(), Counter()))]:
            n = sum(counts.values())
            cells = " | ".join(f"{100 * counts[k] / n:.0f}%" for k in KINDS)
            print(f"| {pipeline} | {skill} | {n} | {cells} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
