"""Data curation: dedup, filters, decontamination and selection, each counted.

LIMA's lesson is that a small curated set can beat a large raw one; for that to be
measurable every step must say what it removed and why. :func:`curate` runs the
steps of a :class:`~posttrain.recipe.schema.CurateSpec` in this fixed order:

1. **normalise** -- NFKC, typographic quotes -> ASCII, whitespace collapsed,
   casefolded. Only the *comparison* texts are normalised; examples are returned
   untouched.
2. **exact dedup** -- on the normalised (prompt, reply) pair (for preference rows
   also the rejected reply: the same prompt and chosen with another rejected reply
   is a different training pair, not a copy). The first occurrence is kept.
3. **near dedup** (``dedup: near``) -- MinHash LSH (datasketch, 128 permutations,
   seeded) over word 3-gram shingles of the same normalised text; LSH candidates
   are confirmed with the MinHash Jaccard estimate; the first row of a cluster is
   kept.
4. **filters** -- empty reply; min/max prompt and reply tokens (``count_tokens``);
   reply/prompt token ratio; refusal/boilerplate regexes (case-insensitive) on the
   reply (preference rows: on the chosen reply only -- a refusal as the *rejected*
   reply is often exactly the signal wanted).
5. **decontaminate** (``decontaminate`` and ``eval_texts`` given) -- word n-grams
   (lowercased, punctuation stripped); a row is dropped when any n-gram of its
   prompt+reply (or of its rejected reply) is an n-gram of an eval text. An eval
   text shorter than n words is one n-gram of its own length, so short eval
   questions are still caught when quoted verbatim.
6. **preference checks** -- chosen == rejected after normalisation; score margin
   (``score_chosen - score_rejected < min_score_margin``) when both scores exist.
7. **select** -- ``random`` / ``longest`` / ``ifd`` / ``diverse`` down to
   ``select.n``. The output always keeps the original order of the rows.

Everything is deterministic given ``seed``. torch/transformers are imported only by
:class:`Scorer`, so curation without a model stays cheap.
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from posttrain.recipe.schema import CurateSpec
    from posttrain.models import ModelSource

NEAR_DUP_NUM_PERM = 128
NEAR_DUP_SHINGLE = 3

Progress = Callable[[str], None]


@dataclass
class CurationReport:
    """What curation did: counts per removal reason, in step order."""

    rows_in: int
    rows_out: int
    removed: dict[str, int] = field(default_factory=dict)
    contaminated_by_task: dict[str, int] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- texts


@dataclass
class _Row:
    """The texts one example is judged on (raw) and compared on (normalised)."""

    prompt: str
    reply: str
    rejected: str | None          # preference rows only
    scores: tuple[float, float] | None
    key_prompt: str = ""
    key_reply: str = ""
    key_rejected: str | None = None

    @property
    def key(self) -> tuple:
        return (self.key_prompt, self.key_reply, self.key_rejected)

    @property
    def key_text(self) -> str:
        parts = [self.key_prompt, self.key_reply] + ([self.key_rejected] if self.key_rejected is not None else [])
        return " ".join(parts)


_WHITESPACE = re.compile(r"\s+")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def normalise(text: str) -> str:
    """Comparison form: copies that differ in unicode form, quotes, spacing or case match."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    return _WHITESPACE.sub(" ", text).strip().casefold()


def _joined(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def _scores(example: dict) -> tuple[float, float] | None:
    chosen, rejected = example.get("score_chosen"), example.get("score_rejected")
    if chosen is None or rejected is None:
        return None
    return float(chosen), float(rejected)


def _row(example: dict, normalize: bool) -> _Row:
    """Instruction: prompt = all but the last message, reply = the last (assistant) one.
    Preference: prompt = prompt messages, reply = chosen, plus rejected. Unpaired: the
    completion is the reply (whichever its label)."""
    if "chosen" in example:
        row = _Row(_joined(example["prompt"]), _joined(example["chosen"]),
                   _joined(example["rejected"]), _scores(example))
    elif "completion" in example:
        row = _Row(_joined(example["prompt"]), _joined(example["completion"]), None, None)
    else:
        messages = example["messages"]
        row = _Row(_joined(messages[:-1]), messages[-1]["content"], None, None)
    canon = normalise if normalize else (lambda text: text)
    row.key_prompt, row.key_reply = canon(row.prompt), canon(row.reply)
    row.key_rejected = None if row.rejected is None else canon(row.rejected)
    return row


# --------------------------------------------------------------------------- dedup


def exact_duplicates(rows: list[_Row], alive: list[int]) -> set[int]:
    """Indices whose comparison key was already seen (first occurrence kept)."""
    seen: set[tuple] = set()
    dropped = set()
    for i in alive:
        key = rows[i].key
        if key in seen:
            dropped.add(i)
        seen.add(key)
    return dropped


def shingles(text: str, size: int = NEAR_DUP_SHINGLE) -> set[bytes]:
    """Word ``size``-grams; a text shorter than that is one shingle of all its words."""
    words = text.split()
    if len(words) < size:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i:i + size]).encode() for i in range(len(words) - size + 1)}


def near_duplicates(texts: list[str], threshold: float, seed: int) -> set[int]:
    """Positions (into ``texts``) of rows near-duplicating an earlier kept row.

    Rows are visited in order; each is queried against the rows kept so far and
    inserted only when it is kept, so the first row of every cluster survives.
    LSH candidates are confirmed with the MinHash Jaccard estimate because LSH
    bands alone also let through some pairs below the threshold.
    """
    from datasketch import MinHash, MinHashLSH

    shingle_sets = [shingles(text) for text in texts]
    minhashes = MinHash.bulk(shingle_sets, num_perm=NEAR_DUP_NUM_PERM, seed=seed)
    lsh = MinHashLSH(threshold=threshold, num_perm=NEAR_DUP_NUM_PERM)
    dropped = set()
    for pos, (minhash, shingle_set) in enumerate(zip(minhashes, shingle_sets)):
        if not shingle_set:      # nothing to compare on; the empty-reply filter decides
            continue
        if any(minhashes[other].jaccard(minhash) >= threshold for other in lsh.query(minhash)):
            dropped.add(pos)
        else:
            lsh.insert(pos, minhash)
    return dropped


# --------------------------------------------------------------------------- filters


class _Tokens:
    """Token counts, computed once and only for the texts a step asks about."""

    def __init__(self, count_tokens: Callable[[str], int]):
        self._count = count_tokens
        self._cache: dict[tuple[int, str], int] = {}

    def prompt(self, i: int, row: _Row) -> int:
        return self._get((i, "prompt"), row.prompt)

    def reply(self, i: int, row: _Row) -> int:
        return self._get((i, "reply"), row.reply)

    def _get(self, key: tuple[int, str], text: str) -> int:
        if key not in self._cache:
            self._cache[key] = self._count(text)
        return self._cache[key]


def _filter_checks(spec: "CurateSpec", tokens: _Tokens) -> list[tuple[str, Callable[[int, _Row], bool]]]:
    """(reason, fails) for every active filter, in the order they are applied."""
    checks: list[tuple[str, Callable[[int, _Row], bool]]] = [
        ("empty reply", lambda i, r: not r.reply.strip())]
    bounds = [("prompt too short", tokens.prompt, spec.min_prompt_tokens, True),
              ("prompt too long", tokens.prompt, spec.max_prompt_tokens, False),
              ("reply too short", tokens.reply, spec.min_reply_tokens, True),
              ("reply too long", tokens.reply, spec.max_reply_tokens, False)]
    for reason, measure, limit, is_min in bounds:
        if limit is not None:
            checks.append((reason, _bound_check(measure, limit, is_min)))
    ratio = lambda i, r: tokens.reply(i, r) / max(tokens.prompt(i, r), 1)  # noqa: E731
    if spec.min_reply_prompt_ratio is not None:
        checks.append(("reply/prompt ratio too low", _bound_check(ratio, spec.min_reply_prompt_ratio, True)))
    if spec.max_reply_prompt_ratio is not None:
        checks.append(("reply/prompt ratio too high", _bound_check(ratio, spec.max_reply_prompt_ratio, False)))
    if spec.drop_refusals and spec.refusal_patterns:
        refusal = re.compile("|".join(f"(?:{p})" for p in spec.refusal_patterns), re.IGNORECASE)
        checks.append(("refusal/boilerplate", lambda i, r: refusal.search(r.key_reply) is not None))
    return checks


def _bound_check(measure: Callable[[int, _Row], float], limit: float, is_min: bool) -> Callable[[int, _Row], bool]:
    if is_min:
        return lambda i, r: measure(i, r) < limit
    return lambda i, r: measure(i, r) > limit


# --------------------------------------------------------------------------- decontamination


_PUNCTUATION = re.compile(r"[^\w\s]")


def ngram_words(text: str) -> list[str]:
    """Lowercased words with punctuation stripped: the unit of contamination n-grams."""
    return _PUNCTUATION.sub("", unicodedata.normalize("NFKC", text).lower()).split()


def _ngrams(words: list[str], n: int) -> Iterable[tuple[str, ...]]:
    return zip(*(words[k:] for k in range(n)))


def eval_ngram_index(eval_texts: dict[str, list[str]], n: int) -> dict[int, dict[tuple[str, ...], set[str]]]:
    """length -> {n-gram: tasks}. Eval texts shorter than ``n`` words give one n-gram
    of their own length, so every length that occurs gets its own table."""
    index: dict[int, dict[tuple[str, ...], set[str]]] = {}
    for task, texts in eval_texts.items():
        for text in texts:
            words = ngram_words(text)
            if not words:
                continue
            size = min(n, len(words))
            table = index.setdefault(size, {})
            for gram in _ngrams(words, size):
                table.setdefault(gram, set()).add(task)
    return index


def contaminating_tasks(texts: Iterable[str], index: dict[int, dict[tuple[str, ...], set[str]]]) -> set[str]:
    """The eval tasks any n-gram of ``texts`` belongs to (empty: clean)."""
    tasks: set[str] = set()
    for text in texts:
        words = ngram_words(text)
        for size, table in index.items():
            for gram in _ngrams(words, size):
                hit = table.get(gram)
                if hit:
                    tasks |= hit
    return tasks


# --------------------------------------------------------------------------- selection


def select_random(count: int, n: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(count), n))


def select_longest(reply_tokens: list[int], n: int) -> list[int]:
    order = sorted(range(len(reply_tokens)), key=lambda i: (-reply_tokens[i], i))
    return sorted(order[:n])


def select_ifd(scores: list[float], n: int) -> list[int]:
    """The n highest IFD among rows with IFD < 1 (the prompt helps predict the reply).

    When fewer than n rows qualify, the rest are filled from IFD >= 1 rows, lowest
    (least unhelpful prompt) first; non-finite scores come last.
    """
    finite = [i for i, s in enumerate(scores) if math.isfinite(s)]
    helpful = sorted((i for i in finite if scores[i] < 1), key=lambda i: (-scores[i], i))
    unhelpful = sorted((i for i in finite if scores[i] >= 1), key=lambda i: (scores[i], i))
    rest = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    return sorted((helpful + unhelpful + rest)[:n])


def tfidf_embeddings(texts: list[str]):
    """Unit rows of TF-IDF over word 1-2 grams, as a sparse matrix.

    Terms found in a single row are dropped (``min_df=2``): they add nothing to the
    similarity between two rows, only push rows full of rare tokens (names, typos,
    ids) to the top of k-center, which already over-picks outliers; dropping them
    also halves the time on 10k rows. Kept sparse: k-center's cost is then one
    pass over the non-zeros per pick, exact cosine with no SVD projection.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    for min_df in (2, 1):   # tiny inputs may have no term shared by two rows
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b", sublinear_tf=True,
                                     min_df=min_df, dtype=np.float32)
        try:
            return vectorizer.fit_transform(texts).tocsr()
        except ValueError:
            continue
    return np.zeros((len(texts), 1), dtype=np.float32)  # no word in any text


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


def _row_vector(embeddings, index: int) -> np.ndarray:
    row = embeddings[index]
    return np.asarray(row.toarray()).ravel() if hasattr(row, "toarray") else row


def k_center_greedy(embeddings, n: int, seed: int) -> list[int]:
    """Greedy k-center (cosine distance on unit rows): each pick is the row farthest
    from all picks so far -- a 2-approximation of the best coverage of the data.

    Starts from a seeded random row. ``embeddings`` is a dense array or a scipy
    sparse matrix; each pick costs one matrix-vector product (about 1.5 s for
    1,000 picks over 10k TF-IDF rows).
    """
    count = embeddings.shape[0]
    first = random.Random(seed).randrange(count)
    chosen = [first]
    distance = 1.0 - np.asarray(embeddings @ _row_vector(embeddings, first)).ravel()
    distance[first] = -np.inf          # picked rows stay at -inf through np.minimum
    while len(chosen) < n:
        pick = int(np.argmax(distance))  # ties: the lowest index
        chosen.append(pick)
        distance = np.minimum(distance, 1.0 - np.asarray(embeddings @ _row_vector(embeddings, pick)).ravel())
        distance[pick] = -np.inf
    return sorted(chosen)


# --------------------------------------------------------------------------- curate


class _Run:
    """State of one curate() call: surviving indices and the report being filled."""

    def __init__(self, examples: list[dict], spec: "CurateSpec", progress: Progress | None):
        self.examples, self.spec, self._progress = examples, spec, progress
        self.rows = [_row(example, spec.normalize) for example in examples]
        self.alive = list(range(len(examples)))
        self.report = CurationReport(rows_in=len(examples), rows_out=len(examples))

    def drop(self, step: str, reasons: list[str], dropped: dict[int, str]) -> None:
        """Remove ``dropped`` (index -> reason) and record the step and its counts."""
        before = len(self.alive)
        for reason in reasons:
            self.report.removed[reason] = self.report.removed.get(reason, 0)
        for reason in dropped.values():
            self.report.removed[reason] += 1
        self.alive = [i for i in self.alive if i not in dropped]
        self.report.steps.append(step)
        self.report.rows_out = len(self.alive)
        self.say(f"{step}: removed {before - len(self.alive)} of {before}, {len(self.alive)} left")

    def say(self, message: str) -> None:
        if self._progress is not None:
            self._progress(message)


def curate(examples: list[dict], spec: "CurateSpec", *, count_tokens: Callable[[str], int],
           eval_texts: dict[str, list[str]] | None = None, seed: int = 0,
           scorer: "Scorer | None" = None, progress: Progress | None = None) -> tuple[list[dict], CurationReport]:
    """Run the steps of ``spec`` (order in the module docstring); return the kept
    examples (unchanged, original order) and what was removed why.

    ``count_tokens`` should be the training tokenizer's count of a plain text
    (no chat template) so that token limits mean what the trainer sees.
    ``eval_texts`` maps an eval task name to its documents' texts. ``scorer`` is
    required by ``select: ifd`` and optional for ``diverse`` (TF-IDF otherwise).
    """
    run = _Run(examples, spec, progress)
    if spec.normalize:
        run.report.steps.append("normalise")
    if spec.dedup in ("exact", "near"):
        run.drop("exact dedup", ["exact duplicate"],
                 {i: "exact duplicate" for i in exact_duplicates(run.rows, run.alive)})
    if spec.dedup == "near":
        _near_dedup(run, seed)
    tokens = _Tokens(count_tokens)
    _filter(run, tokens)
    if spec.decontaminate:
        _decontaminate(run, eval_texts)
    if any(run.rows[i].rejected is not None for i in run.alive):
        _preference_checks(run)
    if spec.select is not None:
        _select(run, tokens, seed, scorer)
    return [examples[i] for i in run.alive], run.report


def _near_dedup(run: _Run, seed: int) -> None:
    texts = [run.rows[i].key_text for i in run.alive]
    positions = near_duplicates(texts, run.spec.near_dup_threshold, seed)
    run.drop("near dedup", ["near duplicate"], {run.alive[p]: "near duplicate" for p in positions})


def _filter(run: _Run, tokens: _Tokens) -> None:
    checks = _filter_checks(run.spec, tokens)
    dropped = {}
    for i in run.alive:
        for reason, fails in checks:
            if fails(i, run.rows[i]):
                dropped[i] = reason
                break
    run.drop("filters", [reason for reason, _ in checks], dropped)


def _decontaminate(run: _Run, eval_texts: dict[str, list[str]] | None) -> None:
    if eval_texts is None:
        run.say("decontaminate: skipped (no eval texts given)")
        return
    index = eval_ngram_index(eval_texts, run.spec.decontaminate_ngram)
    dropped = {}
    for i in run.alive:
        row = run.rows[i]
        texts = [row.prompt + "\n" + row.reply] + ([row.rejected] if row.rejected is not None else [])
        tasks = contaminating_tasks(texts, index)
        if tasks:
            dropped[i] = "contaminated"
            for task in sorted(tasks):
                run.report.contaminated_by_task[task] = run.report.contaminated_by_task.get(task, 0) + 1
    run.drop("decontaminate", ["contaminated"], dropped)


def _preference_checks(run: _Run) -> None:
    spec, reasons, dropped = run.spec, [], {}
    if spec.drop_identical_pairs:
        reasons.append("chosen == rejected")
    if spec.min_score_margin is not None:
        reasons.append("score margin")
    for i in run.alive:
        row = run.rows[i]
        if row.rejected is None:
            continue
        if spec.drop_identical_pairs and row.key_reply == row.key_rejected:
            dropped[i] = "chosen == rejected"
        elif (spec.min_score_margin is not None and row.scores is not None
              and row.scores[0] - row.scores[1] < spec.min_score_margin):
            dropped[i] = "score margin"
    if reasons:
        run.drop("preference checks", reasons, dropped)


def _select(run: _Run, tokens: _Tokens, seed: int, scorer: "Scorer | None") -> None:
    select = run.spec.select
    step, reason = f"select ({select.strategy})", f"not selected ({select.strategy})"
    if select.strategy == "ifd" and scorer is None:
        raise ValueError("select: ifd needs a scorer (posttrain.data.curate.Scorer)")
    alive = run.alive
    if select.n >= len(alive):
        run.drop(step, [reason], {})
        return
    if select.strategy == "random":
        picked = select_random(len(alive), select.n, seed)
    elif select.strategy == "longest":
        picked = select_longest([tokens.reply(i, run.rows[i]) for i in alive], select.n)
    elif select.strategy == "ifd":
        run.say(f"{step}: scoring {len(alive)} rows")
        picked = select_ifd(scorer.ifd([run.examples[i] for i in alive]), select.n)
    else:
        texts = [run.rows[i].prompt + "\n" + run.rows[i].reply for i in alive]
        embeddings = _unit_rows(np.asarray(scorer.embed(texts), dtype=np.float32)) if scorer \
            else tfidf_embeddings(texts)
        picked = k_center_greedy(embeddings, select.n, seed)
    kept = {alive[p] for p in picked}
    run.drop(step, [reason], {i: reason for i in alive if i not in kept})


# --------------------------------------------------------------------------- scorer


class Scorer:
    """A causal LM that scores rows: IFD for quality, mean-pooled states for diversity.

    Both go through the model's chat template, like training, so a reply is judged
    on the same tokens the trainer would see. The model is put in eval mode.
    """

    def __init__(self, model, tokenizer, batch_size: int = 32):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        limit = getattr(tokenizer, "model_max_length", None)
        # Tokenizers without a limit report a huge sentinel; cap memory at 2048 tokens.
        self.max_length = limit if isinstance(limit, int) and 0 < limit <= 32768 else 2048

    @classmethod
    def from_source(cls, source: "ModelSource", batch_size: int = 32) -> "Scorer":
        from posttrain.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(source)
        return cls(model, tokenizer, batch_size=batch_size)

    def ifd(self, examples: list[dict]) -> list[float]:
        """IFD = loss(reply | prompt) / loss(reply alone), mean token losses (Li et al. 2024).

        Both losses cover the same reply tokens (the templated reply, end-of-turn
        included); "alone" means after a single start token (BOS, else EOS) so the
        first reply token is scored too. Lower than 1: the prompt helps.
        """
        from posttrain.logprobs import reply_token_ids

        start = self.tokenizer.bos_token_id
        start = self.tokenizer.eos_token_id if start is None else start
        conditioned, alone = [], []
        for example in examples:
            prompt, reply = _prompt_and_reply(example)
            prompt_ids, reply_ids = self._fit(*reply_token_ids(self.tokenizer, prompt, reply))
            conditioned.append((prompt_ids, reply_ids))
            alone.append(([start], reply_ids))
        losses_with = self._mean_losses(conditioned)
        losses_alone = self._mean_losses(alone)
        return [_ratio(a, b) for a, b in zip(losses_with, losses_alone)]

    def _fit(self, prompt_ids: list[int], reply_ids: list[int]) -> tuple[list[int], list[int]]:
        """Keep the sequence within max_length: cut the reply's tail, then the prompt's head."""
        reply_ids = reply_ids[: max(self.max_length // 2, self.max_length - len(prompt_ids))]
        return prompt_ids[-(self.max_length - len(reply_ids)):], reply_ids

    def _mean_losses(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """Mean negative log-likelihood of each reply; batches sorted by length (less padding)."""
        from posttrain.logprobs import sequence_logps

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        logps = sequence_logps(self.model, [pairs[i] for i in order], pad_id, self.batch_size)
        losses = [0.0] * len(pairs)
        for i, logp in zip(order, logps):
            losses[i] = -logp / len(pairs[i][1]) if pairs[i][1] else math.nan
        return losses

    def embed(self, texts: list[str]) -> np.ndarray:
        """Mean of the last hidden state over real tokens, l2-normalised: one row per text."""
        import torch

        device = next(self.model.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        rows: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            encoded = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(device)
            with torch.no_grad():
                hidden = self.model(**encoded, output_hidden_states=True).hidden_states[-1].float()
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            for i, vector in zip(batch, torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()):
                rows[i] = vector
        return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def _prompt_and_reply(example: dict) -> tuple[list[dict], list[dict]]:
    if "chosen" in example:
        return example["prompt"], example["chosen"]
    if "completion" in example:
        return example["prompt"], example["completion"]
    return example["messages"][:-1], example["messages"][-1:]


def _ratio(conditioned: float, alone: float) -> float:
    if not (math.isfinite(conditioned) and math.isfinite(alone)) or alone <= 0:
        return math.nan
    return conditioned / alone
