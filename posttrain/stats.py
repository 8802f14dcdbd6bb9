"""Intervals for the report: means and paired differences over seeds x eval items.

Pure numpy, deterministic. Each (pipeline, seed) is scored on the SAME eval items,
so a pipeline's scores form a crossed (n_seeds, n_items) matrix. Two noise sources
matter: which training seed we happened to draw, and which finite set of eval items
we happened to have. The intervals come from a percentile bootstrap that resamples
both, independently and with replacement. Differences from a baseline are computed
cell by cell (same item, same seed) BEFORE resampling: item difficulty is shared by
both pipelines, so pairing cancels it and exposes differences that two separate,
overlapping intervals would hide.

Every bootstrap takes an explicit `seed` (numpy's default_rng), so a report
regenerates byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000

def level_text(confidence: float) -> str:
    """0.95 -> "95%", 0.975 -> "97.5%"."""
    return f"{confidence * 100:g}%"


def ci_method_text(confidence: float = DEFAULT_CONFIDENCE, resamples: int = DEFAULT_RESAMPLES) -> str:
    """How the report's intervals were computed, with the settings actually used."""
    return (f"Intervals are {level_text(confidence)} percentile bootstraps ({resamples} seeded resamples) "
            "that resample training seeds and eval items independently with replacement, so they cover both "
            "seed-to-seed variation and the finite eval set. Differences from the baseline are paired: "
            "computed per item and seed before resampling (an untrained baseline is compared with every seed).")


@dataclass(frozen=True)
class Interval:
    """A mean with a bootstrap interval, and what it was computed from."""

    mean: float
    lo: float
    hi: float
    n_seeds: int
    n_items: int
    method: str

    @property
    def excludes_zero(self) -> bool:
        """True when zero lies outside [lo, hi]: for a difference, 'distinguishable from zero'."""
        return self.lo > 0.0 or self.hi < 0.0


def _seed_key(seed: int | None) -> tuple[bool, int]:
    # None (an untrained model) sorts first; ints ascending.
    return (seed is not None, 0 if seed is None else int(seed))


def score_matrix(records: dict[int | None, dict[int, float]]) -> tuple[np.ndarray, list, list]:
    """(n_seeds, n_items) scores over the item ids common to every seed.

    `records` maps seed (None for an untrained model) -> {item_id: score}. Seeds are
    sorted (None first), item ids sorted. Items missing from some seed are dropped
    rather than rejected: a cell must exist for every seed for the crossed bootstrap
    and the seed-wise pairing to be meaningful, and a truncated eval (e.g. a limit)
    should not sink the whole report. Raises ValueError when there are no seeds, no
    common item, or a score is not finite.
    """
    if not records:
        raise ValueError("score_matrix: no seeds given")
    seeds = sorted(records, key=_seed_key)
    common = set(records[seeds[0]])
    for s in seeds[1:]:
        common &= set(records[s])
    if not common:
        sizes = ", ".join(f"seed {s}: {len(records[s])} items" for s in seeds)
        raise ValueError(f"score_matrix: the seeds share no eval item ({sizes})")
    items = sorted(common)
    matrix = np.array([[float(records[s][i]) for i in items] for s in seeds], dtype=float)
    if not np.all(np.isfinite(matrix)):
        raise ValueError("score_matrix: a score is NaN or infinite")
    return matrix, seeds, items


def _as_matrix(scores: np.ndarray, name: str) -> np.ndarray:
    """A 1-D vector is one seed; anything else must be a non-empty 2-D finite matrix."""
    m = np.asarray(scores, dtype=float)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"{name}: expected a non-empty (n_seeds, n_items) matrix, got shape {np.shape(scores)}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name}: contains NaN or infinite scores")
    return m


def _resample_counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """(resamples, n) multiplicities of a with-replacement draw of n out of n.

    Counts rather than index arrays: the mean of a resampled sub-matrix is then a
    weighted sum, which vectorises without materialising (resamples, seeds, items).
    """
    if n == 1:
        return np.ones((resamples, 1))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)


def _bootstrap_means(m: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Means of `resamples` sub-matrices drawn by resampling rows AND columns independently.

    Resampling only items would treat the seeds as fixed and ignore seed variance;
    resampling only seeds would ignore that the eval set is a finite sample. In a
    crossed design, drawing both is the standard two-way bootstrap of the grand mean.
    Item draws are made before seed draws so that one-seed results do not depend on
    whether seed draws happen.
    """
    n_seeds, n_items = m.shape
    item_w = _resample_counts(rng, n_items, resamples)  # (R, n_items)
    seed_w = _resample_counts(rng, n_seeds, resamples)  # (R, n_seeds)
    row_sums = seed_w @ m  # (R, n_items): resampled seeds, summed per item
    return np.einsum("ri,ri->r", row_sums, item_w) / (n_seeds * n_items)


def _method(n_seeds: int, resamples: int, what: str) -> str:
    if n_seeds == 1:
        return f"{what}bootstrap over items ({resamples} resamples)"
    return f"{what}bootstrap over seeds and items ({resamples} resamples)"


def _check_args(confidence: float, resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(resamples) < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")


def _interval(m: np.ndarray, confidence: float, resamples: int, seed: int, what: str) -> Interval:
    """Percentile bootstrap interval of the grand mean of `m`.

    The matrix is centred on its mean first (less float drift in the sums); a
    constant matrix has no spread to resample, so it returns lo == hi == mean ==
    that value exactly instead of a float-rounded mean.
    """
    _check_args(confidence, resamples)
    if np.ptp(m) == 0.0:
        mean, lo, hi = float(m.flat[0]), 0.0, 0.0
    else:
        mean = float(m.mean())
        boot = _bootstrap_means(m - mean, np.random.default_rng(seed), int(resamples))
        alpha = 1.0 - confidence
        lo, hi = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
    return Interval(
        mean=mean,
        lo=mean + float(lo),
        hi=mean + float(hi),
        n_seeds=m.shape[0],
        n_items=m.shape[1],
        method=_method(m.shape[0], int(resamples), what),
    )


def mean_interval(
    scores: np.ndarray, *, confidence: float = DEFAULT_CONFIDENCE, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> Interval:
    """Mean score with a percentile-bootstrap interval.

    One row (one seed, or an untrained model): bootstrap over items only. Several
    rows: seeds and items are both resampled, so the interval widens when seeds
    disagree, not only when the eval set is small. A 1-D array counts as one row.
    """
    return _interval(_as_matrix(scores, "scores"), confidence, resamples, seed, "")


def _paired_differences(scores: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Cell-by-cell differences: row i with row i, or a one-row side against every row."""
    a = _as_matrix(scores, "scores")
    b = _as_matrix(baseline, "baseline")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"paired_delta: scores have {a.shape[1]} items but baseline has {b.shape[1]}; "
            "pairing needs the same items in the same order"
        )
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(
            f"paired_delta: cannot pair {a.shape[0]} seeds with {b.shape[0]} baseline seeds "
            "(need equal counts, or one side with a single row)"
        )
    return a - b  # numpy broadcasting handles the one-row side


def paired_delta(
    scores: np.ndarray,
    baseline: np.ndarray,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Mean of `scores - baseline`, paired by item and seed, with a bootstrap interval.

    Columns must be the same items. Equal row counts pair seed i with seed i; a
    one-row side (e.g. the untrained base model) is compared with every row of the
    other. The per-cell differences are bootstrapped with the same seed-and-item
    scheme as `mean_interval`, which is the same as drawing identical indices for
    both pipelines: shared item difficulty cancels, so the interval is far
    narrower than the two unpaired intervals suggest. `excludes_zero` on the result
    says whether the difference is distinguishable from zero.
    """
    return _interval(_paired_differences(scores, baseline), confidence, resamples, seed, "paired ")
