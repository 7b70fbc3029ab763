"""The person's own biases, measured against the world's true utility.

A vote is explained by the true utility of the two answers and by three things that should not matter beyond
it. Each of the person's decided votes (ties and "both bad" left out) is oriented as shown (A = left) and fit by

    P(left preferred) = sigmoid(b_pos + b_u * (u_L - u_R) + b_len * (len_L - len_R) + b_conf * (c_L - c_R))

with u the true utility (`preflab.world.true_utility`), len the length in words and c = 1 for a confident
answer, 0 for one that hedges ("I am not sure"). b_pos > 0: the left answer is preferred for being on the left;
b_len > 0: the longer one for being longer; b_conf > 0: the confident one for sounding sure, each beyond
what the true utility explains (hedging is right on unanswerable questions, and the utility knows it).

Departure from `preflab eval bias` (whose helpers this reuses: `fit_logistic`, `wilson`, `prefer_longer`): a
weak ridge (L2 = `RIDGE`, a Gaussian prior of sd ~1.4 per coefficient). A careful person's 30 votes often
follow the utility perfectly; unpenalised, b_u then runs off to infinity and the Wald intervals with it.
The intervals are Wald intervals (the Fisher information at the ridge estimate): approximate for 30 votes,
which is why the raw rates with Wilson intervals are shown beside them.
"""

from __future__ import annotations

import numpy as np

from preflab.collect.agreement import audit_votes_from_rows
from preflab.data.text import n_words
from preflab.evaluate import bias
from preflab.evaluate.stats import fit_logistic
from preflab.world.tutor import HEDGE

MIN_VOTES = 10
RIDGE = 0.5
COLUMNS = ("position", "utility", "length", "confidence")


def confident(text: str) -> int:
    return int(HEDGE not in text)


def features(votes: list[bias.Vote], utility: dict) -> np.ndarray:
    """Rows [1, u_L - u_R, len_L - len_R, c_L - c_R] in the order of COLUMNS."""
    return np.array(
        [
            [
                1.0,
                utility[(v.key[0], v.a)] - utility[(v.key[0], v.b)],
                n_words(v.a) - n_words(v.b),
                confident(v.a) - confident(v.b),
            ]
            for v in votes
        ],
        dtype=np.float64,
    ).reshape(-1, len(COLUMNS))


def regression(X: np.ndarray, y: np.ndarray) -> dict:
    """Coefficients with 95% Wald intervals; a column with no variation is reported as None (nothing to learn)."""
    w, se = fit_logistic(X, y, l2=RIDGE)
    out = {}
    for j, name in enumerate(COLUMNS):
        if j > 0 and not np.any(X[:, j]):
            out[name] = None
            continue
        low, high = w[j] - bias.Z95 * se[j], w[j] + bias.Z95 * se[j]
        out[name] = {
            "coef": float(w[j]),
            "low": float(low),
            "high": float(high),
            "excludes_zero": bool(low > 0 or high < 0),
        }
    return out


def prefer_confident(votes: list[bias.Vote], utility: dict) -> dict:
    """P(the confident answer wins) where exactly one answer hedges, and how often the truth says it is better."""
    mixed = [v for v in votes if confident(v.a) != confident(v.b)]
    won = [int((v.winner == 1) == bool(confident(v.a))) for v in mixed]
    out = bias.wilson(sum(won), len(mixed))
    if mixed:
        better = []
        for v in mixed:
            sure, hedged = (v.a, v.b) if confident(v.a) else (v.b, v.a)
            u_sure, u_hedged = utility[(v.key[0], sure)], utility[(v.key[0], hedged)]
            better.append(1.0 if u_sure > u_hedged else 0.5 if u_sure == u_hedged else 0.0)
        out["truth_prefers"] = float(np.mean(better))
    return out


def person_biases(rows: list[dict]) -> dict:
    """The page's bias panel from one person's export rows (`preflab.collect.export.vote_row`)."""
    votes = [v for v in audit_votes_from_rows([r for r in rows if not r.get("both_bad")]) if v.winner != -1]
    out = {"votes": len(votes), "min_votes": MIN_VOTES, "ready": len(votes) >= MIN_VOTES}
    if not out["ready"]:
        return out
    utility = bias.world_utilities(votes)
    if utility is None:
        return {**out, "ready": False, "reason": "these prompts are not the world's: no true utility"}
    X, y = features(votes, utility), np.array([v.winner for v in votes], dtype=np.float64)
    out["coefficients"] = regression(X, y)
    out["prefer_left"] = bias.wilson(int(y.sum()), len(y))
    out["prefer_longer"] = bias.prefer_longer(votes, utility, True, clear=3)
    out["prefer_confident"] = prefer_confident(votes, utility)
    out["agree_with_truth"] = agreement_with_truth(votes, utility)
    return out


def agreement_with_truth(votes: list[bias.Vote], utility: dict) -> dict:
    """How often the person picked the answer of higher true utility, where the utilities differ."""
    decided = [v for v in votes if utility[(v.key[0], v.a)] != utility[(v.key[0], v.b)]]
    hits = sum(int((utility[(v.key[0], v.a)] > utility[(v.key[0], v.b)]) == (v.winner == 1)) for v in decided)
    return bias.wilson(hits, len(decided))
