"""`preflab eval bias FILE`: do annotators prefer the longer or the first-shown response beyond what quality explains?

Method: logistic regression of the vote on the pair's features, each vote oriented as shown (A = the
response shown first, from the row's `chosen_position`):

    P(A preferred) = sigmoid(b_pos + b_u[k] * (u_A - u_B) + b_len * (len_A - len_B))

with u the world's true utility (a covariate: longer responses may simply be better or worse), one utility
slope b_u[k] per annotator k with at least `min_votes_per_slope` votes (each annotator has its own noise;
the rest share one slope), lengths in words. b_len is the length bias per word beyond what the utility
explains, b_pos the position bias (logit in favour of the first-shown response). 95% confidence intervals are
Wald intervals from the inverse Fisher information (`ci: wald`), or, with `--bootstrap N`, percentiles of N
refits on pairs resampled with replacement (all votes on a pair move together: `ci: cluster bootstrap`).

Where the prompts are not world questions the utility is unknown: the regression then has no quality
covariate, and b_len mixes length bias with any real link between length and quality (the report says so).
Without `chosen_position` the orientation is arbitrary (texts in sorted order) and no position term is fit.

Also reported: P(prefer first) and P(prefer longer when the lengths differ by >= `clear_length_diff` words),
the latter beside what the utility alone predicts; per-annotator agreement with the leave-one-out majority on
pairs voted on several times; Cohen's kappa for each pair of annotators sharing items; Krippendorff's alpha
(nominal). Ties are left out of the regression and the rates, and kept as a category for kappa and alpha.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from preflab.config import check, opt
from preflab.data.text import n_words
from preflab.evaluate.stats import fit_logistic
from preflab.stages import stage

Z95 = 1.959963984540054


@dataclass
class BiasConfig:
    file: str = opt(
        "", "the comparison JSONL to audit (also accepted as the first positional argument)", positional=True
    )
    out: str = opt("", "run folder to write (default runs/bias-<time>)")
    clear_length_diff: int = opt(5, "lengths 'differ clearly' when they differ by at least this many words")
    utility: str = opt(
        "auto", "auto: the world's true utility as covariate where every prompt is a world question; none: no covariate"
    )
    min_votes_per_slope: int = opt(30, "annotators with fewer votes share one utility slope")
    bootstrap: int = opt(0, "0: Wald CIs; N > 0: cluster-bootstrap CIs from N refits on resampled pairs")
    min_shared: int = opt(5, "Cohen's kappa only for annotator pairs sharing at least this many pairs")
    seed: int = opt(0, "random seed (bootstrap)")

    def __post_init__(self):
        check(self.utility in ("auto", "none"), f"utility must be 'auto' or 'none', got {self.utility!r}")
        check(self.clear_length_diff >= 1, f"clear_length_diff must be >= 1, got {self.clear_length_diff}")
        check(self.bootstrap >= 0, f"bootstrap must be >= 0, got {self.bootstrap}")


@dataclass
class Vote:
    key: tuple  # the pair: (prompt, first text, second text) in sorted text order
    a: str  # shown first (or the first in sorted order when positions are unknown)
    b: str
    winner: int  # 1: a preferred, 0: b preferred, -1: tie
    annotator: str
    prompt: object


def read_votes(path: str) -> tuple[list[Vote], bool]:
    """Votes from a comparison file (validated by `load_preferences`), and whether positions are known."""
    from preflab.data import load_preferences
    from preflab.data.preferences import completion_text

    data = load_preferences(path)
    with open(path, encoding="utf-8-sig") as handle:  # split into lines exactly as load_preferences does
        raw = dict(enumerate(handle, 1))
    votes, positioned = [], True
    for row in data.rows:
        extra = json.loads(raw[int(row.source.rsplit(":", 1)[1])])
        chosen = completion_text(row.chosen, row.source, "chosen")
        rejected = completion_text(row.rejected, row.source, "rejected")
        position = extra.get("chosen_position")
        if position not in ("A", "B", None):
            from preflab.data import DataError

            raise DataError(row.source, f'field \'chosen_position\': expected "A" or "B", got {position!r}')
        positioned &= position is not None
        first, second = sorted((chosen, rejected))
        if position == "A" or (position is None and chosen == first):
            a, b = chosen, rejected
        else:
            a, b = rejected, chosen
        winner = -1 if row.tie else int(a == chosen)
        key = (json.dumps(row.prompt, sort_keys=True), first, second)
        votes.append(Vote(key, a, b, winner, row.annotator or "?", row.prompt))
    return votes, positioned


def world_utilities(votes: list[Vote]):
    """{text-in-context: true utility} when every prompt is a world question, else None."""
    from preflab.world import true_utility

    cache = {}
    try:
        for v in votes:
            for text in (v.a, v.b):
                if (v.key[0], text) not in cache:
                    cache[(v.key[0], text)] = true_utility(v.prompt, text).total
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return cache


def design(votes: list[Vote], utility, positioned: bool, min_votes: int):
    """Feature matrix, labels and column names for the regression (see the module docstring)."""
    counts = Counter(v.annotator for v in votes)
    slopes = sorted(k for k, c in counts.items() if c >= min_votes)
    cols = (["position"] if positioned else []) + ["length"]
    if utility is not None:
        cols += [f"utility[{k}]" for k in slopes] + (["utility[others]"] if len(slopes) < len(counts) else [])
    X = np.zeros((len(votes), len(cols)))
    for i, v in enumerate(votes):
        row = dict.fromkeys(cols, 0.0)
        if positioned:
            row["position"] = 1.0
        row["length"] = n_words(v.a) - n_words(v.b)
        if utility is not None:
            du = utility[(v.key[0], v.a)] - utility[(v.key[0], v.b)]
            row[f"utility[{v.annotator}]" if v.annotator in slopes else "utility[others]"] = du
        X[i] = [row[c] for c in cols]
    return X, np.array([v.winner for v in votes], dtype=np.float64), cols


def coefficient_cis(X, y, cols, votes, bootstrap: int, seed: int) -> dict:
    w, se = fit_logistic(X, y)
    out = {
        c: {"coef": float(w[j]), "low": float(w[j] - Z95 * se[j]), "high": float(w[j] + Z95 * se[j])}
        for j, c in enumerate(cols)
    }
    if bootstrap:
        rng = np.random.default_rng(seed)
        groups = defaultdict(list)
        for i, v in enumerate(votes):
            groups[v.key].append(i)
        clusters = list(groups.values())
        fits = []
        for _ in range(bootstrap):
            rows = [i for c in rng.integers(0, len(clusters), len(clusters)) for i in clusters[c]]
            fits.append(fit_logistic(X[rows], y[rows])[0])
        lo, hi = np.percentile(np.array(fits), [2.5, 97.5], axis=0)
        for j, c in enumerate(cols):
            out[c]["low"], out[c]["high"] = float(lo[j]), float(hi[j])
    for c in out.values():
        c["excludes_zero"] = c["low"] > 0 or c["high"] < 0
    return out


def wilson(successes: int, n: int) -> dict:
    """A proportion with its 95% Wilson score interval."""
    if n == 0:
        return {"rate": None, "low": None, "high": None, "n": 0}
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return {"rate": p, "low": centre - half, "high": centre + half, "n": n}


def prefer_longer(votes, utility, positioned, clear: int) -> dict:
    """P(the longer response wins) where lengths differ by >= clear words, and what utility alone predicts."""
    idx = [i for i, v in enumerate(votes) if abs(n_words(v.a) - n_words(v.b)) >= clear]
    longer_won = [int((n_words(votes[i].a) > n_words(votes[i].b)) == bool(votes[i].winner)) for i in idx]
    out = wilson(sum(longer_won), len(idx))
    if utility is not None and idx:
        X, y, cols = design(votes, utility, positioned, min_votes=10**9)
        keep = [j for j, c in enumerate(cols) if c != "length"]
        w, _ = fit_logistic(X[:, keep], y)
        p_a = 1 / (1 + np.exp(-(X[idx][:, keep] @ w)))
        a_longer = np.array([n_words(votes[i].a) > n_words(votes[i].b) for i in idx])
        out["predicted_by_utility"] = float(np.where(a_longer, p_a, 1 - p_a).mean())
    return out


def label(v: Vote) -> int:
    """The vote as a category of the pair, independent of display order: 0 / 1 = which sorted text won, 2 = tie."""
    if v.winner == -1:
        return 2
    return 0 if (v.a if v.winner == 1 else v.b) == v.key[1] else 1


def agreement(votes: list[Vote], min_shared: int) -> dict:
    """Leave-one-out majority agreement per annotator, Cohen's kappa per annotator pair, Krippendorff's alpha."""
    units = defaultdict(list)
    for v in votes:
        units[v.key].append((v.annotator, label(v)))
    per_annotator = defaultdict(lambda: [0, 0])
    for unit in units.values():
        for i, (who, value) in enumerate(unit):
            others = Counter(x for j, (_, x) in enumerate(unit) if j != i)
            top = others.most_common(2)
            if sum(others.values()) < 2 or (len(top) == 2 and top[0][1] == top[1][1]):
                continue  # fewer than two other votes, or no majority among them
            per_annotator[who][0] += int(value == top[0][0])
            per_annotator[who][1] += 1
    loo = {k: {"agreement": a / n, "n": n} for k, (a, n) in sorted(per_annotator.items())}
    # Cohen's kappa: kappa = (p_o - p_e) / (1 - p_e) over the pairs both annotators labelled
    by_annotator = defaultdict(dict)
    for key, unit in units.items():
        for who, value in unit:
            by_annotator[who].setdefault(key, value)
    kappas = {}
    for x, y in combinations(sorted(by_annotator), 2):
        shared = sorted(set(by_annotator[x]) & set(by_annotator[y]))
        if len(shared) < min_shared:
            continue
        lx, ly = [by_annotator[x][k] for k in shared], [by_annotator[y][k] for k in shared]
        p_o = sum(a == b for a, b in zip(lx, ly)) / len(shared)
        p_e = sum((lx.count(c) / len(shared)) * (ly.count(c) / len(shared)) for c in (0, 1, 2))
        kappas[f"{x}|{y}"] = {"kappa": (p_o - p_e) / (1 - p_e) if p_e < 1 else None, "n": len(shared)}
    return {
        "loo_majority": loo,
        "cohen_kappa": kappas,
        "mean_cohen_kappa": _mean([k["kappa"] for k in kappas.values() if k["kappa"] is not None]),
        "krippendorff_alpha": krippendorff_alpha([[x for _, x in u] for u in units.values()]),
        "pairs_with_several_votes": sum(len(u) >= 2 for u in units.values()),
    }


def krippendorff_alpha(units: list[list[int]]) -> float | None:
    """Nominal Krippendorff's alpha = 1 - D_o / D_e from the coincidence matrix (Krippendorff 2011)."""
    coincidence = Counter()
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for i, j in ((i, j) for i in range(m) for j in range(m) if i != j):
            coincidence[(values[i], values[j])] += 1 / (m - 1)
    n = sum(coincidence.values())
    if n < 2:
        return None
    marg = Counter()
    for (c, _), w in coincidence.items():
        marg[c] += w
    observed = sum(w for (c, k), w in coincidence.items() if c != k) / n
    expected = sum(marg[c] * marg[k] for c in marg for k in marg if c != k) / (n * (n - 1))
    return None if expected == 0 else 1 - observed / expected


def _mean(values):
    return sum(values) / len(values) if values else None


def audit_votes(votes: list[Vote], positioned: bool, config: BiasConfig) -> dict:
    """The whole audit as a dict (the CLI prints and saves it)."""
    decided = [v for v in votes if v.winner != -1]
    if len(decided) < 10:
        from preflab.data import DataError

        raise DataError(config.file, f"only {len(decided)} non-tie votes: too few to audit", "give at least 10")
    utility = world_utilities(decided) if config.utility == "auto" else None
    X, y, cols = design(decided, utility, positioned, config.min_votes_per_slope)
    coefs = coefficient_cis(X, y, cols, decided, config.bootstrap, config.seed)
    return {
        "file": config.file,
        "votes": len(votes),
        "ties": len(votes) - len(decided),
        "ci": "cluster bootstrap" if config.bootstrap else "wald",
        "covariate": "true utility (per-annotator slopes)" if utility is not None else "none (utility unknown)",
        "length_unit": "words",
        "length_bias": coefs["length"],
        "position_bias": coefs.get("position"),
        "coefficients": coefs,
        "p_prefer_first": wilson(int(y.sum()), len(y)) if positioned else None,
        "p_prefer_longer": prefer_longer(decided, utility, positioned, config.clear_length_diff),
        "annotators": agreement(votes, config.min_shared),
    }


def format_report(r: dict) -> str:
    def ci(c):
        return (
            "n/a"
            if c is None
            else f"{c['coef']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]" + (" *" if c["excludes_zero"] else "")
        )

    def rate(p):
        return (
            "n/a" if not p or p["rate"] is None else f"{p['rate']:.3f} [{p['low']:.3f}, {p['high']:.3f}] (n={p['n']})"
        )

    longer = r["p_prefer_longer"]
    lines = [
        f"bias audit of {r['file']}: {r['votes']} votes ({r['ties']} ties); covariate: {r['covariate']}; "
        f"95% CI: {r['ci']}",
        f"  length bias (logit per word"
        f"{', beyond utility' if r['covariate'].startswith('true') else ', no quality covariate'}): "
        f"{ci(r['length_bias'])}",
        f"  position bias (logit for the first shown): {ci(r['position_bias'])}",
        f"  P(prefer first):  {rate(r['p_prefer_first'])}",
        f"  P(prefer longer): {rate(longer)}"
        + (
            f"; utility alone predicts {longer['predicted_by_utility']:.3f}" if "predicted_by_utility" in longer else ""
        ),
    ]
    ann = r["annotators"]
    if ann["loo_majority"]:
        lines.append(
            "  agreement with the leave-one-out majority: "
            + ", ".join(f"{k} {v['agreement']:.2f} (n={v['n']})" for k, v in ann["loo_majority"].items())
        )
    for name, value in (
        ("mean Cohen's kappa", ann["mean_cohen_kappa"]),
        ("Krippendorff's alpha", ann["krippendorff_alpha"]),
    ):
        lines.append(
            f"  {name}: " + ("n/a (no pair voted on by several annotators)" if value is None else f"{value:.3f}")
        )
    lines.append("  (* the 95% CI excludes 0)")
    return "\n".join(lines)


@stage(BiasConfig)
def audit(config: BiasConfig) -> dict:
    from preflab.runs import Run

    check(bool(config.file), "give the comparison file: preflab eval bias FILE.jsonl")
    votes, positioned = read_votes(config.file)
    result = audit_votes(votes, positioned, config)
    run = Run(config.out or None, "bias", config, tensorboard=False)
    (run.dir / "bias.json").write_text(json.dumps(result, indent=2) + "\n")
    print(format_report(result), flush=True)
    lb, pb = result["length_bias"], result["position_bias"] or {}
    return run.finish(
        {
            "votes": result["votes"],
            "length_bias": lb["coef"],
            "length_bias_low": lb["low"],
            "length_bias_high": lb["high"],
            "position_bias": pb.get("coef"),
            "position_bias_low": pb.get("low"),
            "position_bias_high": pb.get("high"),
            "krippendorff_alpha": result["annotators"]["krippendorff_alpha"],
        }
    )
