"""Noisy builtin skills (posttrain.data.noisy) and dataset statistics (posttrain.data.inspect)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from posttrain.data.builtin import eval_rows, generate_items
from posttrain.data.formats import convert_row
from posttrain.data.inspect import format_inspection, inspect_source, percentiles
from posttrain.data.noisy import NOISE_MIX, TAGS, noisy_skills_rows, noisy_skills_rows_tagged
from posttrain.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------- noisy


@pytest.fixture(scope="module")
def noisy() -> tuple[list[dict], list[str]]:
    return noisy_skills_rows_tagged(n_clean=600, seed=3)


def _prompt(row: dict) -> str:
    return row["messages"][0]["content"]


def _reply(row: dict) -> str:
    return row["messages"][-1]["content"]


def test_noisy_is_deterministic_and_depends_on_the_seed(noisy):
    rows, tags = noisy
    assert noisy_skills_rows_tagged(n_clean=600, seed=3) == (rows, tags)
    assert noisy_skills_rows(n_clean=600, seed=3) == rows
    assert noisy_skills_rows(n_clean=600, seed=4) != rows


def test_noisy_tag_fractions_match_the_documented_mix(noisy):
    rows, tags = noisy
    assert len(rows) == len(tags) == 2000
    assert set(tags) <= set(TAGS)
    counts = Counter(tags)
    assert counts["clean"] == 600
    for tag, share in NOISE_MIX.items():
        assert counts[tag] / len(tags) == pytest.approx(share, abs=0.005), tag
    assert abs(sum(NOISE_MIX.values()) - 1) < 1e-9


def test_noisy_rows_are_canonical_instruction_rows(noisy):
    rows, _ = noisy
    for row in rows:
        assert set(row) == {"messages"}
        assert convert_row(row, "messages") == row
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]


def test_noisy_clean_rows_are_the_builtin_train_items_answered_concisely(noisy):
    rows, tags = noisy
    clean = [row for row, tag in zip(rows, tags) if tag == "clean"]
    expected = [{"messages": [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": item.answer}]}
                for item in generate_items("train", 600, 3)]
    assert Counter(map(json.dumps, clean)) == Counter(map(json.dumps, expected))


def test_noisy_leaks_are_eval_prompts_verbatim_with_their_answers(noisy):
    rows, tags = noisy
    answers = {row["prompt"]: row["answer"] for row in eval_rows()}
    leaks = [row for row, tag in zip(rows, tags) if tag == "leak"]
    assert leaks
    for row in leaks:
        assert answers[_prompt(row)] == _reply(row)
    # Other rows meet held-out prompts only by chance, in the digits skill (builtin
    # splits the word pool, not the numbers: "Count the digits in 87." can be in both).
    others = {_prompt(row) for row, tag in zip(rows, tags) if tag != "leak"}
    assert all("digit" in prompt for prompt in others & answers.keys())


def test_noisy_duplicates_and_noise_look_as_described(noisy):
    rows, tags = noisy

    def normal(text: str) -> str:
        return " ".join(text.lower().split())

    by_tag: dict[str, list[dict]] = {}
    for row, tag in zip(rows, tags):
        by_tag.setdefault(tag, []).append(row)
    clean = {(normal(_prompt(r)), normal(_reply(r))) for r in by_tag["clean"]}
    clean_prompts = {_prompt(r) for r in by_tag["clean"]}
    # Exact duplicates: equal after normalising; some differ before it.
    assert all((normal(_prompt(r)), normal(_reply(r))) in clean for r in by_tag["exact_dup"])
    assert any(_prompt(r) not in clean_prompts for r in by_tag["exact_dup"])
    # Near duplicates: a clean prompt inside a longer one, with the clean row's answer.
    for row in by_tag["near_dup"]:
        prompt = normal(_prompt(row))
        assert (prompt, normal(_reply(row))) not in clean
        assert any(p in prompt and p != prompt and a == normal(_reply(row)) for p, a in clean)
    assert all(_reply(r) and len(_reply(r)) <= 3 for r in by_tag["wrong"])
    boiler = [_reply(r) for r in by_tag["boilerplate"]]
    assert any("As an AI language model" in text for text in boiler)
    assert any(len(text.split()) > 10 for text in boiler)
    assert all(_reply(r).strip() for r in by_tag["truncated"])


def test_noisy_wrong_answers_are_wrong():
    """Every skill's wrong rows: the reply is a count, and not the prompt's true count."""
    from test_builtin_data import word_list

    rows, tags = noisy_skills_rows_tagged(n_clean=300, seed=0)
    seen = set()
    for row, tag in zip(rows, tags):
        if tag != "wrong":
            continue
        prompt, reply = _prompt(row), _reply(row)
        if "digits" in prompt:
            skill, truth = "digits", len(re.findall(r"\d+", prompt)[0])
        elif "words" in prompt:
            skill, truth = "words", len(word_list(prompt))
        else:
            skill, truth = "count", len(re.findall(r'"([a-z]+)"', prompt)[0])
        seen.add(skill)
        assert reply.isdigit() and int(reply) != truth, (prompt, reply)
    assert seen == {"count", "digits", "words"}


# --------------------------------------------------------------------------- inspect


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _messages(prompt: str, reply: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": reply}]})


def test_percentiles_are_nearest_rank():
    assert percentiles([5, 1, 4, 2, 3]) == {"p5": 1, "p25": 2, "p50": 3, "p75": 4, "p95": 5, "max": 5}
    assert percentiles(range(1, 101))["p95"] == 95
    assert percentiles([]) == {"p5": 0, "p25": 0, "p50": 0, "p75": 0, "p95": 0, "max": 0}


def test_inspect_hand_made_file_has_known_stats(tmp_path):
    lines = [
        _messages("one", "a"),                           # prompt 1 word, reply 1
        _messages("one two", "a b"),                     # 2, 2
        _messages("one two three", "a b c"),             # 3, 3
        _messages("ONE  two   three", "a b  C"),         # duplicate of row 3 after normalising
        '{"messages": [{"role": "user", "content": "x"}',  # line 5: bad JSON
        "",                                              # blank line: skipped, numbering kept
        json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                 {"role": "user", "content": "one two three four"},
                                 {"role": "assistant", "content": "a b c d"},
                                 {"role": "user", "content": "more"},
                                 {"role": "assistant", "content": "a b c d e"}]}),  # 4 turns before reply
        _messages("q", " "),                             # line 8: empty reply -> bad row
    ]
    path = _write_jsonl(tmp_path / "tiny.jsonl", lines)
    stats = inspect_source(path, samples=2)
    assert stats["format"] == "messages" and stats["detected"] and stats["kind"] == "instruction"
    assert stats["rows"] == 7 and stats["valid"] == 5
    assert stats["bad_rows"]["count"] == 2
    assert stats["bad_rows"]["first"][0].startswith("tiny.jsonl:5: not valid JSON")
    assert stats["bad_rows"]["first"][1] == 'tiny.jsonl:8: "messages" turn 2 (assistant) is empty'
    assert stats["empty_replies"] == 1
    assert stats["duplicates"] == {"count": 1, "rate": 0.2}
    assert stats["turns"] == {"min": 2, "mean": 2.6, "max": 5}
    assert stats["unit"] == "words (whitespace)"
    # prompt words: 1, 2, 3, 3, 11 (system 2 + user 4 + assistant 4 + user 1); replies: 1, 2, 3, 3, 5
    assert stats["lengths"]["prompt"] == {"p5": 1, "p25": 2, "p50": 3, "p75": 3, "p95": 11, "max": 11}
    assert stats["lengths"]["reply"] == {"p5": 1, "p25": 2, "p50": 3, "p75": 3, "p95": 5, "max": 5}
    # characters beside the words: replies "a", "a b", "a b c", "a b  C", "a b c d e"
    assert stats["characters"]["reply"] == {"p5": 1, "p25": 3, "p50": 5, "p75": 6, "p95": 9, "max": 9}
    assert stats["ignored_columns"] == {} and stats["tool_rows"] == {"count": 0, "first": []}
    assert len(stats["samples"]) == 2 and all("messages" in s and s["row"] >= 1 for s in stats["samples"])
    json.dumps(stats)  # serialisable, for --json output

    chars = inspect_source(path, count_tokens=len, samples=0)
    assert chars["unit"] == "tokens" and chars["samples"] == [] and "characters" not in chars
    assert chars["lengths"]["reply"]["max"] == len("a b c d e")

    text = format_inspection(stats)
    for expected in ("messages (detected)", "tiny.jsonl:5: not valid JSON", "20.0%",
                     "lengths in words (whitespace):", "lengths in characters:"):
        assert expected in text
    assert "ignored columns" not in text

    first_two = inspect_source(path, samples=0, limit=2)   # as loading counts: usable rows
    assert first_two["valid"] == 2 and first_two["lengths"]["reply"]["max"] == 2


def test_inspect_cuts_long_sample_text_and_reports_preference_lengths(tmp_path):
    row = {"prompt": "p " * 10, "chosen": "yes " * 300, "rejected": "no", "score_chosen": 8.0, "score_rejected": 2}
    path = _write_jsonl(tmp_path / "pref.jsonl", [json.dumps(row)])
    stats = inspect_source(path, fmt="preference")
    assert not stats["detected"] and stats["kind"] == "preference"
    assert stats["lengths"]["reply"]["max"] == 300 and stats["lengths"]["rejected"]["max"] == 1
    assert stats["turns"] == {"min": 2, "mean": 2.0, "max": 2}
    content = stats["samples"][0]["chosen"][0]["content"]
    assert len(content) < 300 and content.endswith("chars)")
    text = format_inspection(stats)
    assert "rejected" in text
    if "score_chosen" in stats["samples"][0]:  # scores are kept for curation when formats keeps them
        assert "score_chosen: 8.0" in text


def test_inspect_whole_file_problems_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        inspect_source(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unknown data format"):
        inspect_source(_write_jsonl(tmp_path / "a.jsonl", [_messages("a", "b")]), fmt="nope")
    with pytest.raises(DataError, match="cannot tell the data format"):
        inspect_source(_write_jsonl(tmp_path / "b.jsonl", ['{"text": "x"}']))
    with pytest.raises(DataError, match="no readable rows"):
        inspect_source(_write_jsonl(tmp_path / "c.jsonl", ["not json"]))


def test_inspect_noisy_rows_sees_the_duplicates(tmp_path):
    rows, tags = noisy_skills_rows_tagged(n_clean=300, seed=0)
    path = _write_jsonl(tmp_path / "noisy.jsonl", [json.dumps(row) for row in rows])
    stats = inspect_source(path, progress=True)  # small file: no bar, same numbers
    assert stats["rows"] == stats["valid"] == len(rows)
    assert stats["duplicates"]["rate"] >= NOISE_MIX["exact_dup"]
    assert stats["lengths"]["reply"]["p50"] == 1 and stats["lengths"]["reply"]["max"] > 15


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared real-data samples not present")
@pytest.mark.parametrize("name, fmt, kind, rows, bad", [
    ("alpaca_en_sample.json", "alpaca", "instruction", 300, 0),
    ("sharegpt_preference_sample.json", "sharegpt_preference", "preference", 200, 0),
    ("hh_rlhf_harmless_sample.jsonl", "hh", "preference", 400, 1),
])
def test_inspect_real_samples(name, fmt, kind, rows, bad):
    stats = inspect_source(SHARED_DATA / name)
    assert (stats["format"], stats["kind"], stats["rows"]) == (fmt, kind, rows)
    assert stats["bad_rows"]["count"] == bad and stats["valid"] == rows - bad
    assert stats["lengths"]["reply"]["max"] > stats["lengths"]["reply"]["p50"] > 0
    assert len(stats["samples"]) == 3
    if name.startswith("hh"):
        assert stats["bad_rows"]["first"][0].startswith(f"{name}:87: ")
        assert stats["empty_replies"] == 1
        assert stats["turns"]["max"] > 2
    assert name in format_inspection(stats)


def test_inspect_reports_ignored_columns_and_tool_rows(tmp_path):
    """UltraFeedback-style pairs carry prompt_id/messages/source nothing reads; a tool-call
    row is counted apart (loading refuses the whole file) and named, not mixed with bad rows."""
    pair = {"prompt": "q", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
            "score_chosen": 8.0, "score_rejected": 2.0, "prompt_id": "x1",
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    tool_pair = {**pair, "tools": '[{"name": "f"}]'}
    path = _write_jsonl(tmp_path / "uf.jsonl", [json.dumps(pair), json.dumps({**pair, "source": "sharegpt"}),
                                                json.dumps(tool_pair)])
    stats = inspect_source(path, samples=0)
    assert (stats["format"], stats["rows"], stats["valid"], stats["bad_rows"]["count"]) == ("preference", 3, 2, 0)
    assert stats["ignored_columns"] == {"messages": 2, "prompt_id": 2, "source": 1}
    assert stats["tool_rows"] == {"count": 1, "first": ['uf.jsonl:3: a "tools" column']}
    text = format_inspection(stats)
    assert "  ignored columns: messages, prompt_id (2 rows); source (1 row)" in text
    assert "2 usable, 0 malformed, 1 with tool calls" in text
    assert "tool calls: 1 row; loading refuses this dataset: tool-call conversations" in text
    assert "    uf.jsonl:3: a \"tools\" column" in text


CHINESE = {"messages": [{"role": "user", "content": "请把这句话翻译成英文"},      # 10 characters, no space
                        {"role": "assistant", "content": "Please translate this sentence."}]}


def test_inspect_without_a_recipe_says_words_and_counts_characters(tmp_path):
    stats = inspect_source(_write_jsonl(tmp_path / "zh.jsonl", [json.dumps(CHINESE, ensure_ascii=False)]))
    assert stats["unit"] == "words (whitespace)"
    assert stats["lengths"]["prompt"]["max"] == 1 and stats["characters"]["prompt"]["max"] == 10


def test_inspect_a_recipe_dataset_counts_tokens_of_the_recipe_tokenizer(tmp_path, repo):
    """With a recipe, lengths are tokens of its chat tokenizer (micro-llama's is one token a
    character: the Chinese prompt is 10 tokens, where whitespace counts one word), and the
    dataset's limit is honoured as a run reads it."""
    from click.testing import CliRunner

    from posttrain.cli import main
    from tiny_recipes import write_recipe

    _write_jsonl(tmp_path / "zh.jsonl", [json.dumps(CHINESE, ensure_ascii=False)] * 3
                 + [_messages("one two", "a")])
    recipe = write_recipe(tmp_path, repo, """
        name: zh
        model: {name: builtin:micro-llama}
        data:
          zh: {source: zh.jsonl, limit: 3}
        stages:
          sft: {method: sft, data: zh, learning_rate: 1.0e-3}
        pipelines:
          sft: [sft]
        eval:
          tasks: [{repo}/evals/skills_exact.yaml]
        """)
    result = CliRunner().invoke(main, ["data", "inspect", str(recipe), "--samples", "0"])
    assert result.exit_code == 0, result.output
    assert "3 read: 3 usable" in result.output                 # limit: 3 of the 4 rows
    assert "lengths in tokens (recipe tokenizer: builtin:micro-llama):" in result.output
    prompt = next(line for line in result.output.splitlines() if line.strip().startswith("prompt"))
    assert prompt.split()[1:] == ["10"] * 6                     # p5 .. max: 10 tokens, > 1 per row
    assert "words" not in result.output and "characters" not in result.output


def test_inspect_a_folder_in_the_hub_layout_reads_its_split(tmp_path):
    """`posttrain data inspect ultrachat_200k --split train_sft`, as the README's Data section
    lays a downloaded dataset out (click refused any folder: 'is a directory')."""
    from click.testing import CliRunner

    from hub_fixtures import ultrachat_folder
    from posttrain.cli import main

    folder = ultrachat_folder(tmp_path, n=5)
    result = CliRunner().invoke(main, ["data", "inspect", str(folder), "--split", "train_sft", "--samples", "0"])
    assert result.exit_code == 0, result.output
    assert f"{folder}[train_sft]" in result.output and "messages (detected)" in result.output
    assert "rows        5 read: 5 usable" in result.output and "ignored columns: prompt, prompt_id" in result.output
    wrong = CliRunner().invoke(main, ["data", "inspect", str(folder)])   # no split "train" there
    assert wrong.exit_code == 2 and "Unknown split" in wrong.output and "'train_sft'" in wrong.output, wrong.output
