"""Deliberately noisy instruction data, generated in code, for curation experiments.

The clean core is the quickstart skills' train items (``builtin.generate_items("train",
n_clean, seed)``), each with its concise answer: unlike ``builtin:skills`` there is no
wordy form, so the only thing that varies is the noise the set is about. Noise of
the kinds found in scraped and synthetic instruction sets is mixed in and the whole
is shuffled.  The point of the
set: a curated subset (dedup, refusal/boilerplate and reply-length filters,
decontamination, selection) should do as well as all of it with fewer tokens, and
better than a random subset of the same size.

Every noisy row is tagged, but only in a parallel list from
:func:`noisy_skills_rows_tagged`: the rows themselves carry nothing curation could
cheat with.  Wrong answers are deliberately *not* detectable by generic filters
(they look exactly like clean rows): they stay in as real-world label noise.
"""

from __future__ import annotations

import random

from posttrain.data.builtin import Item, check_split, eval_rows, generate_items

# Share of the *returned* rows per tag (they sum to 1); the counts are rounded,
# and the clean rows are exactly ``n_clean``, so the total is ``n_clean / 0.30``.
NOISE_MIX: dict[str, float] = {
    "clean": 0.30,
    "exact_dup": 0.20,    # a clean row again; a third verbatim, the rest with case/whitespace changed
    "near_dup": 0.10,     # a clean row's prompt plus "Please," or a trailing phrase; same answer
    "wrong": 0.20,        # a fresh prompt with a plausible wrong answer (mostly off-by-one)
    "truncated": 0.05,    # a fresh prompt whose reply was cut off before the answer
    "boilerplate": 0.10,  # refusals, or the right answer buried in chatty filler
    "leak": 0.05,         # a held-out eval prompt (builtin.eval_rows()) verbatim, with its answer
}
TAGS = tuple(NOISE_MIX)

_PREFIXES = ("Please, ", "Please ", "Hey, ", "Quick question: ", "Can you tell me: ")
_SUFFIXES = (" Thanks!", " Thank you.", " Answer briefly.", " Please answer quickly.",
             " Just the answer, please.")
_TRUNCATED = ("The answer is", "There are", "Let me count:", "The word has", "Sure! Here is the",
              "...", "-")
_REFUSALS = (
    "As an AI language model, I cannot count letters.",
    "I'm sorry, but I can't help with that.",
    "I am unable to assist with this request.",
    "As an AI, I don't have the ability to look at words the way humans do.",
)
_FILLERS = (
    "Sure! Here is the answer you asked for: {a}. Let me know if you need anything else, "
    "I am always happy to help!",
    "Great question! After carefully thinking about it step by step, the answer is {a}. "
    "I hope this helps, and feel free to ask me anything else!",
    "Of course! I'd be glad to help you with that. The answer is {a}. If you have any "
    "other questions, don't hesitate to reach out!",
)


def noisy_skills_rows(n_clean: int = 2000, seed: int = 0) -> list[dict]:
    """Noisy skills instruction rows (canonical ``messages`` form); see :data:`NOISE_MIX`.

    Mix, as shares of the returned rows: 30% clean, 20% exact duplicates of clean rows
    (some with changed case/whitespace), 10% near duplicates ("Please, ..." or a
    trailing phrase, same answer), 20% wrong answers (mostly off-by-one
    counts), 5% truncated replies, 10% boilerplate (refusals, or the answer wrapped
    in filler), 5% held-out eval prompts copied verbatim with their answers.
    Deterministic for ``(n_clean, seed)``.
    """
    return noisy_skills_rows_tagged(n_clean, seed)[0]


def noisy_rows(split: str = "train") -> list[dict]:
    """The `builtin:skills-noisy` loader: its one split, `train`."""
    check_split("skills-noisy", split)
    return noisy_skills_rows()


def noisy_skills_rows_tagged(n_clean: int = 2000, seed: int = 0) -> tuple[list[dict], list[str]]:
    """``(rows, tags)``: the rows of :func:`noisy_skills_rows` and, in parallel, each row's tag."""
    if n_clean < 1:
        raise ValueError(f"n_clean must be >= 1, got {n_clean}")
    rng = random.Random(f"noisy-skills-{n_clean}-{seed}")
    counts = _counts(n_clean)
    # One call, so the first n_clean items are exactly instruction_rows("train", n_clean, seed)
    # and the fresh items for wrong/truncated/boilerplate rows never repeat them by construction.
    n_fresh = counts["wrong"] + counts["truncated"] + counts["boilerplate"]
    items = generate_items("train", n_clean + n_fresh, seed)
    clean, fresh = items[:n_clean], iter(items[n_clean:])

    tagged: list[tuple[str, dict]] = [("clean", _row(item.prompt, item.answer)) for item in clean]
    tagged += [("exact_dup", _exact_dup(rng, rng.choice(clean))) for _ in range(counts["exact_dup"])]
    tagged += [("near_dup", _near_dup(rng, rng.choice(clean))) for _ in range(counts["near_dup"])]
    tagged += [("wrong", _wrong(rng, next(fresh))) for _ in range(counts["wrong"])]
    tagged += [("truncated", _row(next(fresh).prompt, rng.choice(_TRUNCATED)))
               for _ in range(counts["truncated"])]
    tagged += [("boilerplate", _boilerplate(rng, next(fresh))) for _ in range(counts["boilerplate"])]
    tagged += [("leak", row) for row in _leaks(rng, counts["leak"])]
    rng.shuffle(tagged)
    return [row for _, row in tagged], [tag for tag, _ in tagged]


def _counts(n_clean: int) -> dict[str, int]:
    total = n_clean / NOISE_MIX["clean"]
    counts = {tag: round(total * share) for tag, share in NOISE_MIX.items()}
    counts["clean"] = n_clean
    return counts


def _row(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}]}


def _exact_dup(rng: random.Random, item: Item) -> dict:
    """The same row: a third verbatim, the rest with case or whitespace changed.

    Every variant is identical after lower-casing and collapsing whitespace, which
    is what an exact-dedup step with normalisation should catch.
    """
    prompt, answer = item.prompt, item.answer
    variant = rng.randrange(6)
    if variant == 2:
        prompt = prompt.lower()
    elif variant == 3:
        prompt = prompt.upper()
    elif variant == 4:
        prompt = "  " + prompt.replace(" ", "  ") + "\n"
    elif variant == 5:
        prompt, answer = prompt.replace(" ", "\t", 1) + " ", f" {answer}\n"
    return _row(prompt, answer)


def _near_dup(rng: random.Random, item: Item) -> dict:
    prompt = item.prompt
    if rng.random() < 0.5:
        prompt = rng.choice(_PREFIXES) + prompt[0].lower() + prompt[1:]
    else:
        prompt = prompt + rng.choice(_SUFFIXES)
    return _row(prompt, item.answer)


def _wrong(rng: random.Random, item: Item) -> dict:
    """A plausible wrong answer: mostly the off-by-one near miss, else a multiple-choice distractor."""
    answer = item.near_miss if rng.random() < 0.75 else rng.choice(item.distractors)
    return _row(item.prompt, answer)


def _boilerplate(rng: random.Random, item: Item) -> dict:
    if rng.random() < 0.5:
        return _row(item.prompt, rng.choice(_REFUSALS))
    return _row(item.prompt, rng.choice(_FILLERS).format(a=item.answer))


def _leaks(rng: random.Random, count: int) -> list[dict]:
    """Eval prompts verbatim; each eval item at most once until all have leaked."""
    held_out = eval_rows()
    order: list[dict] = []
    while len(order) < count:
        order += rng.sample(held_out, len(held_out))
    return [_row(row["prompt"], row["answer"]) for row in order[:count]]
