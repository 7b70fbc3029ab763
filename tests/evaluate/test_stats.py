import math

import numpy as np
import pytest

from preflab.evaluate.stats import (
    bootstrap_mean,
    fit_best_of_n,
    fit_logistic,
    fit_rl,
    length_controlled_win_rate,
    paired_difference,
    win_rate,
)


def test_bootstrap_mean_ci_brackets_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = bootstrap_mean(rng.normal(1.0, 1.0, 50), seed=0)
    large = bootstrap_mean(rng.normal(1.0, 1.0, 2000), seed=0)
    assert small.low < small.mean < small.high
    assert (large.high - large.low) < (small.high - small.low) / 4
    # the CI of a normal mean is ~ mean +- 1.96 sigma / sqrt(n)
    assert large.high - large.low == pytest.approx(2 * 1.96 / math.sqrt(2000), rel=0.15)
    assert large.low < 1.0 < large.high


def test_bootstrap_constant_values_have_zero_width_and_empty_is_nan():
    e = bootstrap_mean([2.0] * 10)
    assert (e.mean, e.low, e.high, e.n) == (2.0, 2.0, 2.0, 10)
    assert math.isnan(bootstrap_mean([]).mean)


def test_paired_difference_sees_a_shift_that_unpaired_noise_hides():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 5, 200)  # large per-prompt variation
    better = base + 0.3  # a small, consistent gain
    d = paired_difference(better, base)
    assert d.mean == pytest.approx(0.3)
    assert d.excludes_zero() and d.low == pytest.approx(0.3)
    with pytest.raises(ValueError):
        paired_difference([1, 2], [1])


def test_win_rate_counts_ties_as_half():
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert win_rate([1, 1], [1, 1]) == 0.5


def test_length_controlled_win_rate_properties():
    rng = np.random.default_rng(0)
    n = 400
    la, lb = rng.integers(5, 40, n), rng.integers(5, 40, n)
    a, b = rng.normal(0, 1, n), rng.normal(0, 1, n)
    ab = length_controlled_win_rate(a, b, la, lb)
    ba = length_controlled_win_rate(b, a, lb, la)
    assert ab.lc_win_rate + ba.lc_win_rate == pytest.approx(1.0, abs=1e-9)  # wr(a, b) = 1 - wr(b, a)
    self_ = length_controlled_win_rate(a, a, la, la)
    assert self_.lc_win_rate == pytest.approx(0.5) and self_.win_rate == 0.5  # wr(a, a) = 0.5


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    # a judge who only prefers the longer answer: raw win rate high, LC win rate ~ 0.5
    rng = np.random.default_rng(0)
    n = 2000
    lb = rng.integers(10, 30, n)
    la = lb + rng.integers(-5, 20, n)  # a is usually longer
    diff = (la - lb) / (la - lb).std()
    p = 1 / (1 + np.exp(-3 * np.tanh(diff)))
    a_wins = rng.random(n) < p
    res = length_controlled_win_rate(a_wins.astype(float), (~a_wins).astype(float), la, lb)
    assert res.win_rate > 0.7
    assert res.lc_win_rate == pytest.approx(0.5, abs=0.05)
    assert res.length_coef == pytest.approx(3.0, rel=0.2)


def test_length_controlled_equals_raw_when_lengths_equal():
    res = length_controlled_win_rate([1, 1, 1, 0], [0, 0, 0, 1], [5] * 4, [5] * 4, l2=0.0)
    assert res.lc_win_rate == pytest.approx(0.75, abs=1e-6)


def test_gao_best_of_n_fit_recovers_parameters_and_peak():
    d = np.linspace(0.1, 3.0, 20)
    fit = fit_best_of_n(d, d * (2.0 - 0.5 * d))
    assert (fit.a, fit.b) == (pytest.approx(2.0), pytest.approx(0.5))
    assert fit.d_star == pytest.approx(2.0)  # alpha / (2 beta)
    assert fit.r_star == pytest.approx(2.0)  # 2 (2 - 1)
    assert fit.rmse == pytest.approx(0.0, abs=1e-9)


def test_gao_rl_fit_recovers_parameters_and_peak():
    d = np.linspace(0.05, 4.0, 30)
    fit = fit_rl(np.concatenate([[0.0], d]), np.concatenate([[0.0], d * (1.0 - 0.8 * np.log(d))]))
    assert (fit.a, fit.b) == (pytest.approx(1.0), pytest.approx(0.8))
    assert fit.d_star == pytest.approx(math.exp(1.0 / 0.8 - 1))
    grid = np.linspace(0.01, 4, 4000)
    assert fit.d_star == pytest.approx(grid[np.argmax(fit.predict(grid))], abs=2e-3)


def test_gao_fit_without_a_turn_has_no_peak():
    d = np.linspace(0.1, 2, 10)
    assert math.isinf(fit_best_of_n(d, d * (1 + 0.3 * d)).d_star)


def test_fit_logistic_by_hand():
    """One binary covariate: the MLE is the log-odds of each group. Group x=0: 6 of 8 are 1, so the intercept is
    logit(3/4) = ln 3; group x=1: 2 of 8, so the slope is logit(1/4) - logit(3/4) = -2 ln 3. The intercept's
    Wald standard error is 1 / sqrt(n p (1 - p)) = 1 / sqrt(8 * 3/16) = sqrt(2/3); the slope's adds both groups'."""
    X = np.array([[1.0, 0.0]] * 8 + [[1.0, 1.0]] * 8)
    y = np.array([1.0] * 6 + [0.0] * 2 + [1.0] * 2 + [0.0] * 6)
    w, se = fit_logistic(X, y, l2=0.0)
    assert w == pytest.approx([math.log(3), -2 * math.log(3)], abs=1e-9)
    assert se == pytest.approx([math.sqrt(2 / 3), math.sqrt(4 / 3)], abs=1e-9)
    # soft labels: four ties (0.5) fit to p = 0.5, w = 0; separable data stay finite under the L2 penalty
    assert fit_logistic(np.ones((4, 1)), np.full(4, 0.5))[0] == pytest.approx([0.0], abs=1e-12)
    w, _ = fit_logistic(np.array([[1.0], [1.0]]), np.array([1.0, 1.0]), l2=1e-3)
    assert np.isfinite(w).all() and w[0] > 5
    # an all-zero column (no length differences at all) gets weight 0 and standard error 0, not an error
    w, se = fit_logistic(np.array([[1.0, 0.0]] * 4), np.array([1.0, 0.0, 1.0, 1.0]))
    assert w[1] == 0.0 and se[1] == 0.0 and w[0] == pytest.approx(math.log(3), abs=1e-5)


def test_auroc_hand_values_perfect_reversed_ties_and_weights():
    from preflab.evaluate.stats import auroc

    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0  # perfect separation
    assert auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0  # reversed
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5  # all tied: each pair counts half
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: wins (0.35 > 0.1), (0.8 > 0.1), (0.8 > 0.4) = 3 / 4
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # one tie: positive 1 vs negative 1 counts half, positive 2 beats it: (0.5 + 1) / 2
    assert auroc([1, 1, 2], [1, 0, 1]) == pytest.approx(0.75)
    # weights 2, 1, 1 (a bootstrap resample drawing item 0 twice): (2 x 0.5 + 1 x 1) / (3 x 1)
    assert auroc([1, 1, 2], [1, 0, 1], weights=[2, 1, 1]) == pytest.approx(2 / 3)
    assert math.isnan(auroc([1, 2], [1, 1]))  # one class only


def test_auroc_matches_the_brute_force_pair_count():
    from preflab.evaluate.stats import auroc

    rng = np.random.default_rng(3)
    s, y = rng.integers(0, 5, 60).astype(float), rng.random(60) < 0.4  # many ties
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, la in zip(s, y) if la for b, lb in zip(s, y) if not lb]
    assert auroc(s, y) == pytest.approx(np.mean(wins))


def test_bootstrap_auroc_interval_holds_the_estimate():
    from preflab.evaluate.stats import bootstrap_auroc

    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = y + rng.normal(0, 1, 200)  # separates, imperfectly
    est = bootstrap_auroc(s, y, n_boot=500)
    assert 0.6 < est.mean < 0.9 and est.low < est.mean < est.high and est.n == 200
    assert est.low > 0.5  # the interval excludes chance
    perfect = bootstrap_auroc([0, 1, 2, 3], [0, 0, 1, 1], n_boot=200)
    assert (perfect.mean, perfect.low, perfect.high) == (1.0, 1.0, 1.0)
