"""Evaluation statistics: pure functions on arrays (no models), each with the formula it implements.

* `bootstrap_mean` / `paired_difference`: mean with a 95% percentile-bootstrap CI (resampling prompts);
* `win_rate`: P(a beats b) with ties counted as half a win;
* `recovered_share`: the share of a loss a fix gives back, (c - b) / (a - b), with a paired CI;
* `auroc` / `bootstrap_auroc`: how well a score separates positives from negatives (Mann-Whitney), with a CI;
* `fit_logistic`: logistic regression (weights and Wald standard errors), for the LC win rate and the bias audit;
* `length_controlled_win_rate`: AlpacaEval 2's length-controlled win rate (Dubois et al. 2024);
* `fit_best_of_n` / `fit_rl`: the over-optimisation forms of Gao, Schulman and Hilton (2022) and their peak.

The analytic best-of-n bounds live with best-of-n itself (`preflab.policy.bon.kl_bound`, `win_rate_bound`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Estimate:
    """A mean and its 95% bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def bootstrap_mean(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of `values` with a percentile-bootstrap CI: resample the values with replacement `n_boot` times."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(float(x.mean()), float(low), float(high), int(x.size))


def paired_difference(a, b, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of a_i - b_i over the same prompts i, with a bootstrap CI over prompts (a paired comparison)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference needs equal shapes, got {a.shape} and {b.shape}")
    return bootstrap_mean(a - b, n_boot, level, seed)


def recovered_share(full, limited, fixed, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """(mean(fixed) - mean(limited)) / (mean(full) - mean(limited)): the share of what `limited` lost against
    `full` that `fixed` gives back (1: all of it, 0: none), the three measured on the same items. The CI
    resamples items jointly for the three (paired); resamples with a zero denominator are left out, and a zero
    denominator in the data gives nan."""
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (full, limited, fixed))
    if not a.shape == b.shape == c.shape:
        raise ValueError(f"recovered_share needs equal shapes, got {a.shape}, {b.shape}, {c.shape}")
    if a.size == 0 or a.mean() == b.mean():
        return Estimate(float("nan"), float("nan"), float("nan"), int(a.size))
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    lost = a[idx].mean(axis=1) - b[idx].mean(axis=1)
    gained = c[idx].mean(axis=1) - b[idx].mean(axis=1)
    shares = gained[lost != 0] / lost[lost != 0]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(shares, [tail, 100 - tail]) if shares.size else (float("nan"),) * 2
    return Estimate(float((c.mean() - b.mean()) / (a.mean() - b.mean())), float(low), float(high), int(a.size))


def outcomes(a, b) -> np.ndarray:
    """Per pair: 1 where a > b, 0.5 where a == b, 0 where a < b."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a > b).astype(np.float64) + 0.5 * (a == b)


def win_rate(a, b) -> float:
    """P(a beats b) over paired scores, ties as half a win: mean(1[a > b] + 0.5 * 1[a == b])."""
    o = outcomes(a, b)
    return float(o.mean()) if o.size else float("nan")


def auroc(scores, labels, weights=None) -> float:
    """Area under the ROC curve of `scores` for the binary `labels`, in its Mann-Whitney form:

        AUROC = P(s_pos > s_neg) + 0.5 P(s_pos == s_neg)

    over all (positive, negative) pairs (ties count half). 1: every positive scores above every negative;
    0: below; 0.5: no separation. `weights` (counts per item, as a bootstrap resample gives) weight the pairs
    by w_pos w_neg. nan when either class is empty. O(N log N): per distinct score value, the positives there
    beat the negatives below it and tie with those at it.
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64)
    values, index = np.unique(s, return_inverse=True)  # sorted distinct scores; index of each item's value
    pos = np.bincount(index, weights=w * y, minlength=len(values))
    neg = np.bincount(index, weights=w * ~y, minlength=len(values))
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def bootstrap_auroc(scores, labels, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """`auroc` with a percentile-bootstrap CI: resample the (score, label) items with replacement `n_boot` times
    (a resample with one class only has no AUROC and is left out of the percentiles)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    point = auroc(s, y)
    if math.isnan(point):
        return Estimate(point, float("nan"), float("nan"), int(s.size))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, s.size, size=(n_boot, s.size))
    boots = np.array([auroc(s, y, np.bincount(d, minlength=s.size)) for d in draws])
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(boots, [tail, 100 - tail])
    return Estimate(point, float(low), float(high), int(s.size))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(z, -30, 30)))  # (clipped: no overflow warning when a weight runs off)


def fit_logistic(X, y, l2: float = 1e-6, iters: int = 100, tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """(weights w, Wald standard errors) of the logistic regression P(y_i = 1) = sigmoid(X_i w), by Newton steps.

    w minimises sum_i BCE(y_i, sigmoid(X_i w)) + l2/2 |w|^2; soft labels y in [0, 1] are allowed (a tie as 0.5).
    The small L2 keeps w finite when the data separate perfectly; the standard errors are sqrt(diag(I^-1)) with
    I = X^T diag(p (1 - p)) X the Fisher information of the unpenalised likelihood at w (pseudo-inverse: a
    column that is all zero gets a standard error of 0 instead of an error).
    """
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    w = np.zeros(X.shape[1])
    for _ in range(iters):
        p = _sigmoid(X @ w)
        grad = X.T @ (p - y) + l2 * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(X.shape[1])
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]  # (singular when l2 = 0 and a column is all zero)
        w -= step
        if np.abs(step).max() < tol:
            break
    p = _sigmoid(X @ w)
    cov = np.linalg.pinv((X * (p * (1 - p))[:, None]).T @ X)
    return w, np.sqrt(np.clip(np.diag(cov), 0, None))


@dataclass
class LengthControlled:
    win_rate: float  # the raw win rate (ties half)
    lc_win_rate: float  # predicted preference at length difference 0
    model_coef: float  # theta: the model's log-odds advantage once length is accounted for
    length_coef: float  # phi: weight of tanh(standardised length difference)

    def as_dict(self) -> dict:
        return asdict(self)


def length_controlled_win_rate(a_scores, b_scores, a_lengths, b_lengths, l2: float = 1e-3) -> LengthControlled:
    """AlpacaEval 2's length-controlled win rate of a over b (Dubois et al. 2024, eq. 1 without instruction terms).

        logit P(a > b) = theta + phi * tanh((len_a - len_b) / std(len_a - len_b))

    fitted by logistic regression on the outcomes (ties as 0.5). As in AlpacaEval there is no global
    intercept besides the model term theta (with one model against one baseline, theta plays that role);
    the LC win rate is the preference predicted at length difference 0, sigmoid(theta). A small L2 penalty
    keeps theta finite when a wins every pair. Properties: LC(a, a) = 0.5 and LC(a, b) = 1 - LC(b, a).
    """
    y = outcomes(a_scores, b_scores)
    diff = np.asarray(a_lengths, dtype=np.float64) - np.asarray(b_lengths, dtype=np.float64)
    std = diff.std()
    z = np.tanh(diff / std) if std > 0 else np.zeros_like(diff)
    X = np.stack([np.ones_like(z), z], axis=1)
    (theta, phi), _ = fit_logistic(X, y, l2)
    return LengthControlled(float(y.mean()), float(1 / (1 + math.exp(-theta))), float(theta), float(phi))


# ---- over-optimisation: Gao, Schulman and Hilton (2022), "Scaling laws for reward model over-optimization" ----


@dataclass
class GaoFit:
    form: str  # "bon": R(d) = d (a - b d);  "rl": R(d) = d (a - b log d)
    a: float
    b: float
    d_star: float  # the d = sqrt(KL) where the fitted gold reward peaks (inf when it never turns)
    r_star: float  # the fitted gold reward at d_star
    rmse: float

    def predict(self, d) -> np.ndarray:
        d = np.asarray(d, dtype=np.float64)
        if self.form == "bon":
            return d * (self.a - self.b * d)
        return d * (self.a - self.b * np.log(np.maximum(d, 1e-12)))

    def as_dict(self) -> dict:
        return asdict(self)


def _least_squares(features: np.ndarray, r: np.ndarray) -> tuple[float, float]:
    (a, b), *_ = np.linalg.lstsq(features, r, rcond=None)
    return float(a), float(b)


def fit_best_of_n(d, r) -> GaoFit:
    """Gao et al. (2022) eq. 1: R_bon(d) = d (alpha - beta d), least squares; peak d* = alpha / (2 beta).

    `d` = sqrt(KL(pi || pi_init)), `r` = gold (true) reward gain over the initial policy (R(0) = 0).
    """
    d, r = np.asarray(d, dtype=np.float64), np.asarray(r, dtype=np.float64)
    a, b = _least_squares(np.stack([d, -d * d], axis=1), r)
    fit = GaoFit("bon", a, b, math.inf, math.nan, 0.0)
    if b > 0:
        fit.d_star = a / (2 * b)
    return _finish(fit, d, r)


def fit_rl(d, r) -> GaoFit:
    """Gao et al. (2022) eq. 2: R_RL(d) = d (alpha - beta log d), least squares; peak d* = exp(alpha / beta - 1).

    (dR/dd = alpha - beta log d - beta = 0.) `d` = sqrt(KL), `r` = gold reward gain (R(0) = 0; d log d -> 0).
    """
    d, r = np.asarray(d, dtype=np.float64), np.asarray(r, dtype=np.float64)
    dlogd = np.where(d > 0, d * np.log(np.maximum(d, 1e-12)), 0.0)
    a, b = _least_squares(np.stack([d, -dlogd], axis=1), r)
    fit = GaoFit("rl", a, b, math.inf, math.nan, 0.0)
    if b > 0 and a / b - 1 < 50:
        fit.d_star = math.exp(a / b - 1)
    return _finish(fit, d, r)


def _finish(fit: GaoFit, d: np.ndarray, r: np.ndarray) -> GaoFit:
    fit.rmse = float(np.sqrt(np.mean((fit.predict(d) - r) ** 2))) if d.size else math.nan
    if math.isfinite(fit.d_star):
        fit.r_star = float(fit.predict(fit.d_star))
    return fit
