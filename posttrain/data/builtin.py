"""Builtin data generated in code: verifiable "skills" for the offline quickstart.

Each example is a short instruction with one checkable answer. Train and test use
disjoint word and number pools, so the held-out split measures generalisation, not
memorisation.

The data leave a choice open that only the preferences settle. An answer has two
acceptable forms: concise (the bare answer, "5") and wordy (a sentence holding it,
"It has 5 letters."). The SFT demonstrations use each form by a seeded coin that
nothing in the prompt predicts, so SFT learns the skill but not which form to use.
The preference pairs always choose the concise, correct reply; the rejected reply
is the same answer in the wordy form (half the pairs: the style preference) or a
plausible near miss in the concise form (the other half: off-by-one counts). The
eval task `evals/skills.yaml` scores both: correct in either form, and concise.

The skills were chosen by measurement on a ~1M-parameter char-level Llama (see
README "Quickstart"): counting skills a tiny model learns in minutes.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

from posttrain.errors import DataError

VOWELS = "aeiou"
CONSONANTS = "bcdfghklmnprstvz"


def make_words(count: int, seed: int) -> list[str]:
    """Pronounceable pseudo-words (3-7 letters), unique, deterministic."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < count:
        length = rng.randint(3, 7)
        start = rng.randint(0, 1)
        words.add("".join(rng.choice(CONSONANTS if (i + start) % 2 == 0 else VOWELS) for i in range(length)))
    return sorted(words)


def split_words(seed: int = 1234, total: int = 3000, test_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Disjoint train/test word pools: a test word never appears in training."""
    words = make_words(total, seed)
    random.Random(seed).shuffle(words)
    n_test = int(total * test_fraction)
    return sorted(words[n_test:]), sorted(words[:n_test])


def number_split(number: str) -> str:
    """The split a number belongs to: a fixed ~20% of all numbers are test numbers.

    Decided by a hash of the digits, so a number drawn for one split never appears
    in the other, whatever the seed or row count.
    """
    return "test" if hashlib.sha256(number.encode()).digest()[0] < 52 else "train"


@dataclass(frozen=True)
class Item:
    skill: str
    prompt: str
    answer: str
    near_miss: str          # a plausible wrong answer (preference `rejected`)
    distractors: tuple[str, ...]  # wrong choices for the multiple-choice task


def _other_letter(rng: random.Random, letter: str) -> str:
    pool = VOWELS if letter in VOWELS else CONSONANTS
    return rng.choice([c for c in pool if c != letter])


def skill_count(rng: random.Random, word: str, pool: list[str], split: str) -> Item:
    phrasing = rng.choice([
        'How many letters are in "{w}"?',
        'Count the letters in the word "{w}".',
        'What is the length of "{w}" in letters?',
        'Number of letters in "{w}"?',
    ])
    n = len(word)
    wrong = [str(k) for k in (n - 1, n + 1, n + 2, n - 2) if k > 0]
    return Item("count", phrasing.format(w=word), str(n), str(n + rng.choice([-1, 1])), tuple(wrong[:3]))


def skill_first(rng: random.Random, word: str, pool: list[str], split: str) -> Item:
    phrasing = rng.choice([
        'What is the first letter of "{w}"?',
        'Give the first letter of the word "{w}".',
        'Which letter does "{w}" start with?',
    ])
    others = [c for c in dict.fromkeys(word[1:]) if c != word[0]]
    near = word[1] if word[1] != word[0] else _other_letter(rng, word[0])
    distractors = tuple((others + [_other_letter(rng, word[0]) for _ in range(3)])[:3])
    return Item("first", phrasing.format(w=word), word[0], near, distractors)


def skill_last(rng: random.Random, word: str, pool: list[str], split: str) -> Item:
    phrasing = rng.choice([
        'What is the last letter of "{w}"?',
        'Give the final letter of the word "{w}".',
        'Which letter does "{w}" end with?',
    ])
    others = [c for c in dict.fromkeys(word[:-1]) if c != word[-1]]
    near = word[-2] if word[-2] != word[-1] else _other_letter(rng, word[-1])
    distractors = tuple((others + [_other_letter(rng, word[-1]) for _ in range(3)])[:3])
    return Item("last", phrasing.format(w=word), word[-1], near, distractors)


def skill_upper(rng: random.Random, word: str, pool: list[str], split: str) -> Item:
    phrasing = rng.choice([
        'Write "{w}" in capital letters.',
        'Convert "{w}" to uppercase.',
        'Uppercase the word "{w}".',
    ])
    answer = word.upper()
    i = rng.randrange(len(word))
    near = answer[:i] + word[i] + answer[i + 1:]
    return Item("upper", phrasing.format(w=word), answer, near,
                (near, word, answer[:-1]))


def _count_wrong(rng: random.Random, n: int) -> tuple[str, tuple[str, ...]]:
    """An off-by-one near miss and three wrong counts for multiple choice."""
    wrong = [str(k) for k in (n - 1, n + 1, n + 2, n - 2, n + 3) if k > 0]
    return str(n + rng.choice([-1, 1]) if n > 1 else n + 1), tuple(wrong[:3])


def skill_words(rng: random.Random, word: str, pool: list[str], split: str) -> Item:
    """Count the words of a short list; the list is built from the split's pool."""
    words = [word] + [rng.choice(pool) for _ in range(rng.randint(1, 6))]
    phrasing = rng.choice([
        "How many words are in: {s}?",
        "Count the words in this list: {s}.",
        "Number of words in \"{s}\"?",
    ])
    near, wrong = _count_wrong(rng, len(words))
    return Item("words", phrasing.format(s=" ".join(words)), str(len(words)), near, wrong)


def skill_digits(rng: random.Random, word: str, pool: list[str], split: str) -> Item:
    """Count the digits of a number (2-8 digits) of the split's number pool."""
    length = rng.randint(2, 8)
    while True:
        number = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(length - 1))
        if number_split(number) == split:
            break
    phrasing = rng.choice([
        "How many digits does {n} have?",
        "Count the digits in {n}.",
        "What is the number of digits of {n}?",
    ])
    near, wrong = _count_wrong(rng, len(number))
    return Item("digits", phrasing.format(n=number), str(len(number)), near, wrong)


SKILLS: dict[str, Callable[..., Item]] = {
    "words": skill_words,
    "digits": skill_digits,
    "count": skill_count,
    "first": skill_first,
    "last": skill_last,
    "upper": skill_upper,
}


# Quickstart skills, chosen by measurement (README "Quickstart"): after SFT of
# tiny-llama (3 epochs, 4,000 rows, ~100 s) held-out exact match per skill was
# digits 100%, count 91%, words 65%, last 15%, first 6%, upper 0%. The three
# counting skills it learns; the look-ups it does not learn were answered by a
# constant ("last" letter: "i" for 37 of 50 items) and are left out.
QUICKSTART_SKILLS = ("count", "digits", "words")
SPLITS = ("train", "test")   # disjoint word pools (split_words) and number pools (number_split)


def generate_items(split: str, n: int, seed: int = 0, skills: tuple[str, ...] = QUICKSTART_SKILLS) -> list[Item]:
    """`n` items of the given split, skills in round-robin, deterministic for (split, n, seed)."""
    if split not in SPLITS:  # any other name once silently gave the held-out test pool
        raise ValueError(f"unknown split {split!r} (splits: {', '.join(SPLITS)})")
    train_words, test_words = split_words()
    words = train_words if split == "train" else test_words
    rng = random.Random(f"{split}-{seed}")
    items = [SKILLS[skills[i % len(skills)]](rng, rng.choice(words), words, split) for i in range(n)]
    return [_distinct_distractors(item) for item in items]


def _distinct_distractors(item: Item) -> Item:
    """Multiple choice needs distinct wrong choices; replace repeats deterministically."""
    seen, out = {item.answer}, []
    for choice in item.distractors:
        while choice in seen:
            choice = choice + "x" if not choice.isdigit() else str(int(choice) + 1)
        seen.add(choice)
        out.append(choice)
    return Item(item.skill, item.prompt, item.answer, item.near_miss, tuple(out))


# The second acceptable form of an answer, per skill: a sentence that holds it.
WORDY_FORMS = {
    "count": "It has {a} letters.",
    "digits": "It has {a} digits.",
    "words": "There are {a} words.",
    "first": "It starts with {a}.",
    "last": "It ends with {a}.",
    "upper": "In capitals: {a}.",
}
# Share of SFT demonstrations in the concise form. One seeded coin per row, so
# the prompt says nothing about the form and SFT is left to guess.
CONCISE_SHARE = 0.5


def wordy(item: Item) -> str:
    """The item's answer in its skill's wordy form."""
    return WORDY_FORMS[item.skill].format(a=item.answer)


def demonstrations(split: str, n: int, seed: int) -> list[tuple[Item, str]]:
    """`(item, reply)` of SFT rows: the reply concise or wordy by a seeded coin."""
    coin = random.Random(f"form-{split}-{seed}")
    return [(item, item.answer if coin.random() < CONCISE_SHARE else wordy(item))
            for item in generate_items(split, n, seed)]


def instruction_rows(split: str = "train", n: int = 4000, seed: int = 0) -> list[dict]:
    check_split("skills", split)
    return [{"messages": [{"role": "user", "content": item.prompt},
                          {"role": "assistant", "content": reply}]}
            for item, reply in demonstrations(split, n, seed)]


def preference_pair(index: int, item: Item) -> tuple[str, str]:
    """`(chosen, rejected)`: chosen is concise and correct; rejected alternates between
    the same answer in the wordy form (even rows) and a concise near miss (odd rows).

    Skills come in round-robin, so with an odd number of skills (3 in the quickstart)
    every skill gets both kinds of rejected reply equally; a test checks it."""
    return item.answer, (wordy(item) if index % 2 == 0 else item.near_miss)


def preference_rows(split: str = "train", n: int = 4000, seed: int = 1) -> list[dict]:
    check_split("skills-preferences", split)
    rows = []
    for i, item in enumerate(generate_items(split, n, seed)):
        chosen, rejected = preference_pair(i, item)
        rows.append({"prompt": [{"role": "user", "content": item.prompt}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def eval_rows(n: int = 200, seed: int = 7) -> list[dict]:
    """Held-out rows for the bundled lm-eval tasks (evals/skills_*.jsonl)."""
    rows = []
    for i, item in enumerate(generate_items("test", n, seed)):
        choices = [item.answer, *item.distractors]
        random.Random(f"choices-{seed}-{i}").shuffle(choices)
        rows.append({"id": i, "skill": item.skill, "prompt": item.prompt, "answer": item.answer,
                     "wordy": wordy(item), "choices": choices, "label": choices.index(item.answer)})
    return rows


# The generated datasets' loaders; builtin:skills-noisy's lives in data/noisy.py, and
# data/sources.py joins both (so this module never imports noisy, which imports it).
BUILTIN_DATASETS: dict[str, Callable[..., list[dict]]] = {
    "skills": instruction_rows,
    "skills-preferences": preference_rows,
}
# What the recipe validator checks without generating rows: each dataset's splits and
# its rows' format (a `format:` in the recipe must be this one, or auto).
BUILTIN_SPLITS: dict[str, tuple[str, ...]] = {
    "skills": SPLITS, "skills-preferences": SPLITS, "skills-noisy": ("train",)}
BUILTIN_FORMATS: dict[str, str] = {
    "skills": "messages", "skills-preferences": "preference", "skills-noisy": "messages"}


def check_split(dataset: str, split: str) -> None:
    """Refuse a split `builtin:<dataset>` does not have (DataError, naming both)."""
    if split not in BUILTIN_SPLITS[dataset]:
        raise DataError(f"builtin:{dataset} has no split {split!r} (splits: {', '.join(BUILTIN_SPLITS[dataset])})")
