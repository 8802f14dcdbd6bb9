"""The builtin skills data: held-out splits disjoint on every generated field, answers
that are right, and a form choice that SFT data leave open and the preferences settle."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from posttrain.data.builtin import (CONCISE_SHARE, QUICKSTART_SKILLS, WORDY_FORMS, eval_rows, generate_items,
                                    instruction_rows, number_split, preference_rows, split_words)


def word_list(prompt: str) -> list[str]:
    """The list of a `words` prompt: after "in:"/"list:", or in quotes."""
    match = re.search(r': (.*)[?.]$', prompt) or re.search(r'"(.*)"', prompt)
    return match.group(1).split()


def fields(items) -> dict[str, set[str]]:
    """Every generated input of the items: the words and the numbers in the prompts."""
    words, numbers = set(), set()
    for item in items:
        if item.skill == "words":
            words.update(word_list(item.prompt))
        elif item.skill == "digits":
            numbers.update(re.findall(r"\d+", item.prompt))
        else:
            words.update(re.findall(r'"([a-z]+)"', item.prompt))
    return {"words": words, "numbers": numbers}


@pytest.fixture(scope="module")
def train_items():
    return generate_items("train", 4000, 0) + generate_items("train", 4000, 1)


@pytest.fixture(scope="module")
def test_items():
    return generate_items("test", 2000, 7) + generate_items("test", 400, 1)


def recount(item) -> str:
    if item.skill == "digits":
        return str(len(re.findall(r"\d+", item.prompt)[0]))
    if item.skill == "count":
        return str(len(re.findall(r'"([a-z]+)"', item.prompt)[0]))
    return str(len(word_list(item.prompt)))


def test_train_and_test_share_no_word_and_no_number(train_items, test_items):
    train, test = fields(train_items), fields(test_items)
    assert train["words"] and test["words"] and train["numbers"] and test["numbers"]
    train_pool, test_pool = map(set, split_words())
    assert train["words"] <= train_pool and test["words"] <= test_pool
    assert not train["words"] & test["words"]
    assert not train["numbers"] & test["numbers"]
    assert {number_split(n) for n in train["numbers"]} == {"train"}
    assert {number_split(n) for n in test["numbers"]} == {"test"}


def test_every_answer_is_right(train_items, test_items):
    for item in train_items[:600] + test_items[:600]:
        assert item.answer == recount(item), item
        assert item.near_miss != item.answer and item.answer not in item.distractors


def test_quickstart_skills_in_equal_measure():
    counts = Counter(row["skill"] for row in eval_rows())
    assert set(counts) == set(QUICKSTART_SKILLS) and max(counts.values()) - min(counts.values()) <= 1


def test_sft_demonstrations_leave_the_form_open():
    """Each form in about half the rows, and no prompt feature (skill, phrasing) predicts it."""
    items = generate_items("train", 4000, 0)
    replies = [row["messages"][1]["content"] for row in instruction_rows("train", 4000, 0)]
    concise = [reply == item.answer for item, reply in zip(items, replies)]
    for item, reply, short in zip(items, replies, concise):
        assert short or reply == WORDY_FORMS[item.skill].format(a=item.answer)
    assert abs(sum(concise) / len(concise) - CONCISE_SHARE) < 0.03
    # Neither the phrasing nor the answer (within a skill) predicts the form.
    groups: dict[tuple, list[bool]] = {}
    for item, short in zip(items, concise):
        groups.setdefault(("phrasing", re.sub(r'"[^"]*"|\d+|: .*', "_", item.prompt)), []).append(short)
        groups.setdefault(("answer", item.skill, item.answer), []).append(short)
    assert sum(kind == "phrasing" for kind, *_ in groups) >= 9
    for group, flags in groups.items():
        if len(flags) >= 100:
            assert 0.38 < sum(flags) / len(flags) < 0.62, group


def test_preferences_choose_the_concise_right_answer():
    items = generate_items("train", 400, 1)
    rows = preference_rows("train", 400, 1)
    kinds: Counter = Counter()
    for i, (item, row) in enumerate(zip(items, rows)):
        assert row["prompt"] == [{"role": "user", "content": item.prompt}]
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen == item.answer
        if rejected == WORDY_FORMS[item.skill].format(a=item.answer):
            kinds[item.skill, "wordy, same answer"] += 1
        else:
            assert rejected == item.near_miss and abs(int(rejected) - int(item.answer)) == 1
            kinds[item.skill, "concise near miss"] += 1
    # Every skill gets both kinds of rejected reply, in about equal measure.
    assert {skill for skill, _ in kinds} == set(QUICKSTART_SKILLS)
    for skill in QUICKSTART_SKILLS:
        assert abs(kinds[skill, "wordy, same answer"] - kinds[skill, "concise near miss"]) <= 1, kinds


def test_eval_rows_hold_both_acceptable_replies():
    for row in eval_rows():
        assert row["wordy"] == WORDY_FORMS[row["skill"]].format(a=row["answer"])
        assert row["choices"][row["label"]] == row["answer"]


def test_breakdown_sorts_replies_by_form_and_correctness():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "evals" / "skills_breakdown.py"
    spec = importlib.util.spec_from_file_location("skills_breakdown", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = {"answer": "5", "wordy": "It has 5 letters."}
    assert [module.kind(reply, doc) for reply in ("5", " 5 ", "It has 5 letters.", "4", "It has 6 letters.",
                                                  "It has 5 digits.", "5 letters", "")] == [
        "concise right", "concise right", "wordy right", "concise wrong", "wordy wrong", "other", "other", "other"]
