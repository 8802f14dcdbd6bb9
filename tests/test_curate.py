"""Curation: every step on small hand-made data whose answer is known."""

import math

import numpy as np
import pytest

from posttrain.recipe.schema import CurateSpec, SelectSpec
from posttrain.data.curate import (CurationReport, Scorer, curate, k_center_greedy, near_duplicates,
                                   normalise, shingles)
from posttrain.data.formats import convert_row


def words(text: str) -> int:
    return len(text.split())


def inst(prompt: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}


def pref(prompt: str, chosen: str, rejected: str, **scores) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], **scores}


def run(examples, count_tokens=words, **kwargs):
    spec_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in CurateSpec.model_fields}
    kept, report = curate(examples, CurateSpec(**spec_fields), count_tokens=count_tokens, **kwargs)
    assert report.rows_in == len(examples) and report.rows_out == len(kept)
    assert report.rows_in - report.rows_out == sum(report.removed.values())
    return kept, report


def vocab(start: int, count: int) -> list[str]:
    return [f"w{i}" for i in range(start, start + count)]


# --------------------------------------------------------------------------- dedup


def test_exact_duplicates_after_normalisation_keep_the_first():
    a = inst("What is  2+2?", "It is four.")
    rows = [a, inst("What is  2+2?", "It is four."), inst("WHAT is 2+2?\n", "it IS four."),
            inst("What is 3+3?", "It is six.")]
    kept, report = run(rows)
    assert kept == [rows[0], rows[3]] and kept[0] is a          # examples returned untouched
    assert report.removed == {"exact duplicate": 2, "empty reply": 0, "reply too short": 0}
    assert report.steps == ["normalise", "exact dedup", "filters"]
    kept, report = run(rows, normalize=False)
    assert len(kept) == 3 and report.removed["exact duplicate"] == 1


def test_normalise():
    assert normalise("  Caf\u00e9\u2019s\t\nMENU ") == "caf\u00e9's menu"
    assert normalise("\uff21") == "a"   # NFKC: fullwidth A


def test_exact_dedup_keeps_preference_pairs_with_different_rejected():
    rows = [pref("q", "good", "bad"), pref("q", "good", "worse"), pref("Q", "GOOD", "bad ")]
    kept, report = run(rows)
    assert kept == rows[:2] and report.removed["exact duplicate"] == 1


def test_near_duplicates_collapse_above_threshold_and_keep_below():
    base = vocab(0, 200)
    one_word = base[:100] + ["changed"] + base[101:]           # 3 shingles differ: J = 195/201
    half = base[:100] + vocab(1000, 100)                        # J = 98/298
    jaccard = lambda a, b: len(shingles(" ".join(a)) & shingles(" ".join(b))) / len(
        shingles(" ".join(a)) | shingles(" ".join(b)))
    assert jaccard(base, one_word) == pytest.approx(195 / 201)
    assert jaccard(base, half) == pytest.approx(98 / 298)
    rows = [inst("Tell me.", " ".join(t)) for t in (base, one_word, half)]
    kept, report = run(rows, dedup="near")
    assert kept == [rows[0], rows[2]]
    assert report.removed["near duplicate"] == 1 and report.steps[:3] == ["normalise", "exact dedup", "near dedup"]
    kept, report = run(rows, dedup="exact")
    assert len(kept) == 3 and "near duplicate" not in report.removed


def test_near_duplicates_are_deterministic_and_keep_the_first_of_a_cluster():
    base = vocab(0, 100)
    texts = [" ".join(base[:50] + [f"x{k}"] + base[51:]) for k in range(5)] + [" ".join(vocab(500, 100))]
    assert near_duplicates(texts, 0.8, seed=0) == {1, 2, 3, 4}
    assert near_duplicates(texts, 0.8, seed=0) == near_duplicates(texts, 0.8, seed=0)


# --------------------------------------------------------------------------- filters


def test_each_filter_counts_its_rows():
    rows = [
        inst("one two three", "a fine reply of six words"),       # kept
        inst("one two three", "   "),                             # empty reply
        inst("one two three", "short"),                           # reply too short (< 2)
        inst("one two three", " ".join(vocab(0, 30))),            # reply too long (> 20)
        inst(" ".join(vocab(100, 40)), "a fine reply here"),      # prompt too long (> 30)
        inst("hi", "a fine reply of six more words"),             # prompt too short (< 2)
        inst("one two three four five six seven eight nine ten", "yes it is"),  # ratio 0.3 < 0.5
        inst("one two", "a b c d e f g h i j k l"),               # ratio 6 > 5
        inst("one two three", "I\u2019m sorry, but I cannot do that."),    # refusal (curly quote)
        inst("one two three", "AS AN AI language model, I think so."),  # refusal
    ]
    kept, report = run(rows, min_prompt_tokens=2, max_prompt_tokens=30, min_reply_tokens=2, max_reply_tokens=20,
                       min_reply_prompt_ratio=0.5, max_reply_prompt_ratio=5, drop_refusals=True)
    assert kept == [rows[0]]
    assert report.removed == {
        "exact duplicate": 0, "empty reply": 1, "prompt too short": 1, "prompt too long": 1,
        "reply too short": 1, "reply too long": 1, "reply/prompt ratio too low": 1,
        "reply/prompt ratio too high": 1, "refusal/boilerplate": 2}


def test_refusals_are_kept_unless_asked_and_checked_on_chosen_only():
    rows = [inst("q x", "I'm sorry, I can't help."), pref("q y", "Sure: here it is.", "I cannot help with that.")]
    kept, _ = run(rows)
    assert kept == rows
    kept, report = run(rows, drop_refusals=True)
    assert kept == [rows[1]] and report.removed["refusal/boilerplate"] == 1


# --------------------------------------------------------------------------- decontamination


EVAL_DOC = ("The quick brown fox jumps over the lazy dog while seven wizards quietly judge "
            "every boxing match held near the old river")   # 22 words
EVAL_TEXTS = {"fox_task": [EVAL_DOC], "short_task": ["Capital of Freedonia?"]}


def test_decontamination_by_13_grams_and_short_eval_texts():
    doc = EVAL_DOC.split()
    rows = [
        inst("Summarise: " + " ".join(doc[3:16]).upper() + "!", "ok then"),    # 13 words shared -> dropped
        inst("Summarise: " + " ".join(doc[3:15]), "ok then"),                 # only 12 -> kept
        inst("Quiz time", "Q: capital of Freedonia? A: Fredville."),          # short eval text verbatim
        inst("Unrelated question", "an unrelated reply"),
    ]
    kept, report = run(rows, decontaminate=True, eval_texts=EVAL_TEXTS)
    assert kept == [rows[1], rows[3]]
    assert report.removed["contaminated"] == 2
    assert report.contaminated_by_task == {"fox_task": 1, "short_task": 1}
    assert report.steps[-1] == "decontaminate"


def test_decontamination_checks_rejected_replies_and_can_be_skipped():
    rows = [pref("q z", "clean", "Capital of Freedonia? Nobody knows.")]
    kept, report = run(rows, decontaminate=True, eval_texts=EVAL_TEXTS)
    assert kept == [] and report.contaminated_by_task == {"short_task": 1}
    messages = []
    kept, report = run(rows, decontaminate=True, progress=messages.append)
    assert kept == rows and "decontaminate" not in report.steps
    assert any("skipped" in m for m in messages)


def test_decontamination_with_smaller_n():
    rows = [inst("alpha beta gamma delta", "fine"), inst("alpha beta zeta", "fine")]
    kept, _ = run(rows, decontaminate=True, decontaminate_ngram=3, eval_texts={"t": ["Beta, GAMMA delta epsilon"]})
    assert kept == [rows[1]]


# --------------------------------------------------------------------------- preference


def test_preference_pair_checks():
    rows = [
        pref("q1", "Same answer.", "same   ANSWER."),                 # identical after normalisation
        pref("q2", "good", "bad", score_chosen=8.0, score_rejected=7.5),   # margin 0.5 < 1
        pref("q3", "good", "bad", score_chosen=9.0, score_rejected=5.0),   # margin 4: kept
        pref("q4", "good", "bad"),                                     # no scores: kept
    ]
    kept, report = run(rows, min_score_margin=1.0)
    assert kept == rows[2:]
    assert report.removed["chosen == rejected"] == 1 and report.removed["score margin"] == 1
    assert report.steps[-1] == "preference checks"
    kept, _ = run(rows, drop_identical_pairs=False)
    assert kept == rows


def test_preference_format_keeps_scores_for_curation():
    row = {"prompt": "q", "chosen": "good", "rejected": "bad", "score_chosen": 8, "score_rejected": 7.5}
    example = convert_row(row, "preference")
    assert (example["score_chosen"], example["score_rejected"]) == (8.0, 7.5)
    kept, report = run([example], min_score_margin=1.0)
    assert kept == [] and report.removed["score margin"] == 1


# --------------------------------------------------------------------------- selection


def numbered(count: int) -> list[dict]:
    return [inst(f"question number {i}", " ".join(["word"] * (i % 7 + 1)) + f" r{i}") for i in range(count)]


def select(rows, strategy, n, **kwargs):
    return run(rows, select=SelectSpec(strategy=strategy, n=n), **kwargs)


def test_random_selection_is_seeded_and_keeps_order():
    rows = numbered(20)
    a, report = select(rows, "random", 5, seed=0)
    b, _ = select(rows, "random", 5, seed=0)
    c, _ = select(rows, "random", 5, seed=1)
    assert a == b and a != c and len(a) == 5
    assert [rows.index(r) for r in a] == sorted(rows.index(r) for r in a)
    assert report.removed["not selected (random)"] == 15 and report.steps[-1] == "select (random)"


def test_selection_keeps_everything_when_n_is_large():
    rows = numbered(4)
    kept, report = select(rows, "random", 10)
    assert kept == rows and report.removed["not selected (random)"] == 0


def test_longest_selection():
    rows = [inst("p", "a b"), inst("p", "a b c d e"), inst("p", "a"), inst("p", "v w x y z"), inst("p", "a b c")]
    kept, _ = select(rows, "longest", 2)
    assert kept == [rows[1], rows[3]]          # tie at 5 tokens: both, original order
    kept, _ = select(rows, "longest", 1)
    assert kept == [rows[1]]                   # tie broken by original index


CLUSTERS = {
    "cooking": ["How do I bake bread with yeast and flour in the oven?",
                "What oven temperature to bake sourdough bread with flour?",
                "Can I bake bread without yeast, just flour and water?",
                "Why did my oven baked bread not rise with the yeast?"],
    "astronomy": ["How far is the nearest star from the sun in light years?",
                  "Why does the sun look bigger than other stars in the sky?",
                  "How many light years across is our galaxy of stars?",
                  "What star is closest to the sun, and how many light years?"],
    "football": ["How many players does a football team have on the pitch?",
                 "Who scored the most goals for a football team in one season?",
                 "What is offside in a football match on the pitch?",
                 "How long is a football match, and how many players per team?"],
}


def cluster_rows() -> tuple[list[dict], list[str]]:
    rows, labels = [], []
    for k in range(4):
        for label, prompts in CLUSTERS.items():
            rows.append(inst(prompts[k], f"An answer about {label}."))
            labels.append(label)
    return rows, labels


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_diverse_tfidf_picks_one_per_cluster(seed):
    rows, labels = cluster_rows()
    kept, report = select(rows, "diverse", 3, seed=seed)
    assert sorted(labels[rows.index(r)] for r in kept) == ["astronomy", "cooking", "football"]
    assert report.removed["not selected (diverse)"] == len(rows) - 3


def test_k_center_greedy_on_points():
    points = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.1, 0.99], [-1, 0]], dtype=np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    assert sorted(k_center_greedy(points, 3, seed=0)) in ([0, 2, 4], [1, 2, 4], [0, 3, 4], [1, 3, 4])


class StubScorer:
    """Returns fixed IFD scores / embeddings, so selection is tested without a model."""

    def __init__(self, scores=None, embeddings=None):
        self.scores, self.embeddings, self.calls = scores, embeddings, 0

    def ifd(self, examples):
        self.calls += 1
        return list(self.scores[:len(examples)])

    def embed(self, texts):
        return self.embeddings[:len(texts)]


def test_ifd_keeps_the_highest_score_below_one():
    rows = numbered(6)
    scorer = StubScorer([0.5, 0.9, 1.4, 0.95, 0.3, math.nan])
    kept, report = select(rows, "ifd", 2, scorer=scorer)
    assert kept == [rows[1], rows[3]] and report.removed["not selected (ifd)"] == 4
    kept, _ = select(rows, "ifd", 5, scorer=StubScorer([0.5, 0.9, 1.4, 0.95, 0.3, 1.2]))
    assert kept == [rows[0], rows[1], rows[3], rows[4], rows[5]]   # fill: lowest IFD >= 1 first
    with pytest.raises(ValueError, match="needs a scorer"):
        select(rows, "ifd", 2)


def test_ifd_is_not_computed_when_everything_fits():
    scorer = StubScorer([0.5])
    kept, _ = select(numbered(3), "ifd", 5, scorer=scorer)
    assert len(kept) == 3 and scorer.calls == 0


def test_diverse_uses_scorer_embeddings_when_given():
    rows = numbered(4)
    embeddings = np.array([[1, 0], [1, 0.01], [0, 1], [0.01, 1]], dtype=np.float32)
    kept, _ = select(rows, "diverse", 2, scorer=StubScorer(embeddings=embeddings))
    assert len(kept) == 2 and {rows.index(r) // 2 for r in kept} == {0, 1}


@pytest.fixture(scope="module")
def micro_scorer():
    from posttrain.models import ModelSource

    return Scorer.from_source(ModelSource(name="builtin:micro-llama"))


def test_real_scorer_ifd_and_embed(micro_scorer):
    rows = [inst("Count the letters in apple.", "5"), inst("Say hi.", "hi there"),
            pref("Reverse abc.", "cba", "abc")]
    scores = micro_scorer.ifd(rows)
    assert len(scores) == 3 and all(math.isfinite(s) and s > 0 for s in scores)
    assert micro_scorer.ifd(rows) == scores                               # deterministic
    vectors = micro_scorer.embed(["hello", "a longer text here"])
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    kept, _ = select(rows[:2] + [inst("Say bye.", "bye")], "ifd", 1, scorer=micro_scorer)
    assert len(kept) == 1


# --------------------------------------------------------------------------- everything


def test_all_steps_in_order_and_the_report_adds_up():
    doc = EVAL_DOC.split()
    rows = (numbered(10)
            + [numbered(10)[0], inst("Hello", "   "), inst("Tell me", "As an AI, I cannot."),
               inst("Quote: " + " ".join(doc[:13]), "ok fine"),
               pref("p", "same", "SAME"), pref("p2", "good answer", "bad", score_chosen=1, score_rejected=0.5)])
    progress = []
    kept, report = run(rows, dedup="near", drop_refusals=True, decontaminate=True, eval_texts=EVAL_TEXTS,
                       min_score_margin=1, select=SelectSpec(strategy="random", n=5), progress=progress.append)
    assert isinstance(report, CurationReport) and len(kept) == 5
    assert report.steps == ["normalise", "exact dedup", "near dedup", "filters", "decontaminate",
                            "preference checks", "select (random)"]
    assert list(report.removed) == ["exact duplicate", "near duplicate", "empty reply", "reply too short",
                                    "refusal/boilerplate", "contaminated", "chosen == rejected", "score margin",
                                    "not selected (random)"]
    assert report.removed["exact duplicate"] == 1 and report.removed["empty reply"] == 1
    assert report.removed["contaminated"] == 1 and report.removed["chosen == rejected"] == 1
    assert report.removed["score margin"] == 1 and report.removed["refusal/boilerplate"] == 1
    assert len(progress) == len(report.steps) - 1             # normalise prints nothing
    assert report.to_dict()["rows_out"] == 5
