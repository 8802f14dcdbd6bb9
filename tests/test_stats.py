"""posttrain.stats: bootstrap intervals over seeds x items, paired differences."""

import math

import numpy as np
import pytest

from posttrain.stats import Interval, ci_method_text, mean_interval, paired_delta, score_matrix


def correlated_pair(n_seeds=3, n_items=300, seed=7):
    """A baseline with varied item difficulty, and a pipeline that equals it except that
    every 17th wrong cell (~6% of the baseline's wrong items, per seed) becomes right."""
    rng = np.random.default_rng(seed)
    difficulty = rng.random(n_items)
    base = (rng.random((n_seeds, n_items)) < difficulty).astype(float)
    other = base.copy()
    for s in range(n_seeds):
        wrong = np.flatnonzero(base[s] == 0)
        other[s, wrong[::17]] = 1.0
    return base, other


# --- known answers ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (1, 50), (3, 40)])
def test_constant_matrix_has_zero_width(shape):
    iv = mean_interval(np.full(shape, 0.3))
    assert iv.mean == iv.lo == iv.hi == 0.3
    assert (iv.n_seeds, iv.n_items) == shape
    assert iv.excludes_zero


def test_single_item_single_seed_is_degenerate():
    iv = mean_interval(np.array([[1.0]]))
    assert iv.mean == iv.lo == iv.hi == 1.0


def test_binary_vector_matches_normal_approximation():
    scores = np.array([1.0, 0.0] * 200)  # p = 0.5, n = 400
    iv = mean_interval(scores)
    half = 1.96 * math.sqrt(0.25 / 400)
    assert iv.mean == 0.5
    assert iv.lo == pytest.approx(0.5 - half, abs=0.01)
    assert iv.hi == pytest.approx(0.5 + half, abs=0.01)
    assert (iv.n_seeds, iv.n_items) == (1, 400)
    assert "items" in iv.method and "2000" in iv.method


def test_deterministic_and_seed_dependent():
    scores = (np.random.default_rng(0).random((3, 100)) < 0.6).astype(float)
    a = mean_interval(scores, seed=0)
    assert a == mean_interval(scores, seed=0)
    b = mean_interval(scores, seed=1)
    assert (a.lo, a.hi) != (b.lo, b.hi)
    assert a.mean == b.mean
    assert abs(a.lo - b.lo) < 0.03 and abs(a.hi - b.hi) < 0.03


def test_confidence_and_resamples():
    scores = (np.random.default_rng(0).random(200) < 0.5).astype(float)
    wide = mean_interval(scores, confidence=0.99)
    narrow = mean_interval(scores, confidence=0.80)
    assert wide.lo < narrow.lo < narrow.hi < wide.hi
    assert "500" in mean_interval(scores, resamples=500).method
    with pytest.raises(ValueError):
        mean_interval(scores, confidence=1.0)
    with pytest.raises(ValueError):
        mean_interval(scores, resamples=0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        mean_interval(np.zeros((0, 5)))
    with pytest.raises(ValueError):
        mean_interval(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError):
        mean_interval(np.array([[0.0, np.nan]]))


# --- two-level bootstrap ---------------------------------------------------------


def test_disagreeing_seeds_widen_the_interval():
    rng = np.random.default_rng(3)
    u = rng.random(200)  # the same items; each seed solves a different share of them
    seeds = np.stack([(u < p).astype(float) for p in (0.2, 0.5, 0.8)])
    one_seed = np.full((1, 200), 0.0)
    one_seed[0, :100] = 1.0  # mean 0.5, the same grand mean, no seed spread
    multi = mean_interval(seeds)
    single = mean_interval(one_seed)
    assert multi.n_seeds == 3 and "seeds" in multi.method
    assert (multi.hi - multi.lo) > 2.5 * (single.hi - single.lo)
    assert multi.lo < 0.3 and multi.hi > 0.7


# --- paired differences ----------------------------------------------------------


def test_paired_delta_detects_what_overlapping_intervals_hide():
    base, other = correlated_pair()
    ib, io = mean_interval(base), mean_interval(other)
    delta = paired_delta(other, base)
    assert io.lo < ib.hi  # the unpaired intervals overlap ...
    assert not (io.lo > ib.hi or ib.lo > io.hi)
    assert delta.excludes_zero and delta.lo > 0  # ... but the paired difference excludes zero
    assert delta.mean == pytest.approx(io.mean - ib.mean)
    assert (delta.hi - delta.lo) < 0.5 * (ib.hi - ib.lo)
    assert delta.method.startswith("paired") and (delta.n_seeds, delta.n_items) == (3, 300)


def test_paired_delta_of_identical_pipelines_is_zero():
    base, _ = correlated_pair()
    d = paired_delta(base, base)
    assert d.mean == d.lo == d.hi == 0.0
    assert not d.excludes_zero


def test_paired_delta_broadcasts_one_row_baseline():
    base, other = correlated_pair(n_seeds=3, n_items=120)
    untrained = base[:1]
    d = paired_delta(other, untrained)
    assert d.mean == pytest.approx((other - untrained).mean())
    assert (d.n_seeds, d.n_items) == (3, 120)
    reverse = paired_delta(untrained, other)  # and vice versa
    assert reverse.mean == pytest.approx(-d.mean)
    assert reverse.n_seeds == 3
    assert d == paired_delta(other, untrained[0])  # a 1-D baseline is one row


def test_paired_delta_rejects_mismatched_shapes():
    a = np.zeros((3, 10))
    with pytest.raises(ValueError, match="items"):
        paired_delta(a, np.zeros((3, 11)))
    with pytest.raises(ValueError, match="seeds"):
        paired_delta(a, np.zeros((2, 10)))


def test_excludes_zero_property():
    def iv(lo, hi):
        return Interval(mean=(lo + hi) / 2, lo=lo, hi=hi, n_seeds=1, n_items=1, method="x")

    assert iv(0.01, 0.2).excludes_zero
    assert iv(-0.2, -0.01).excludes_zero
    assert not iv(-0.01, 0.2).excludes_zero
    assert not iv(0.0, 0.2).excludes_zero


# --- score_matrix ----------------------------------------------------------------


def test_score_matrix_untrained_model():
    m, seeds, items = score_matrix({None: {2: 1.0, 0: 0.0, 1: 1.0}})
    assert seeds == [None] and items == [0, 1, 2]
    assert m.shape == (1, 3) and m.tolist() == [[0.0, 1.0, 1.0]]


def test_score_matrix_intersects_items_and_sorts_seeds():
    records = {
        2: {0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0},
        1: {1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0},
    }
    m, seeds, items = score_matrix(records)
    assert seeds == [1, 2] and items == [1, 2, 3]
    assert m.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    assert m.dtype == float


def test_score_matrix_none_sorts_first_and_bools_become_floats():
    m, seeds, _ = score_matrix({3: {0: True}, None: {0: False}})
    assert seeds == [None, 3] and m.tolist() == [[0.0], [1.0]]


def test_score_matrix_errors():
    with pytest.raises(ValueError, match="no seeds"):
        score_matrix({})
    with pytest.raises(ValueError, match="share no eval item"):
        score_matrix({0: {0: 1.0}, 1: {1: 1.0}})
    with pytest.raises(ValueError, match="NaN"):
        score_matrix({0: {0: float("nan")}})


def test_method_text_mentions_both_noise_sources():
    text = ci_method_text()
    assert "seeds" in text and "items" in text and "paired" in text.lower()
    assert "95% percentile" in text and "(2000 seeded resamples)" in text
    other = ci_method_text(0.975, 500)
    assert "97.5% percentile" in other and "(500 seeded resamples)" in other and "95%" not in other
