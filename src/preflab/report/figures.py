"""The report's figures: each takes plain data (metrics rows, eval.json, sweep.json, samples) and returns a
matplotlib Figure, or None when the data for it is absent. `png_base64(fig)` embeds one in HTML."""

from __future__ import annotations

import base64
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Metric-name fragments worth plotting from a training run, in order of interest.
CURVE_KEYS = (
    "loss",
    "accuracy",
    "objective/scores",
    "objective/kl",
    "rlhf_reward",
    "rewards/margins",
    "rollout/length",
    "true_utility",
    "eval/reward",
    "perplexity",
)


def png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(values) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def curve_series(rows: list[dict], max_series: int = 4) -> dict[str, tuple[list, list]]:
    """name -> (steps, values) for the most interesting metrics in a run's metrics.jsonl rows."""
    names = sorted({k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
    chosen = []
    for frag in CURVE_KEYS:
        chosen += [n for n in names if frag in n and n not in chosen]
    series = {}
    for n in chosen[:max_series]:
        pts = [(r["step"], r[n]) for r in rows if isinstance(r.get(n), (int, float)) and math.isfinite(r[n])]
        if len(pts) >= 2:
            series[n] = ([p[0] for p in pts], [p[1] for p in pts])
    return series


def training_curves(runs: dict[str, list[dict]]):
    """One panel per run: its main metrics against the step."""
    panels = {name: curve_series(rows) for name, rows in runs.items()}
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.2 * nrows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels.items()):
        for metric, (steps, values) in series.items():
            ax.plot(steps, values, label=metric, lw=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=6)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def disagreement_curves(runs: dict[str, list[dict]]):
    """Per RL run that watched an ensemble (`--monitor-ensemble`): the members' disagreement on the step's samples
    (left axis) beside the samples' true utility (right axis, world prompts), against the step."""
    panels = {}
    for name, rows in runs.items():
        keys = sorted({k for r in rows for k in r if k.endswith("/ensemble/disagreement")})
        if keys:
            stage = keys[0].split("/", 1)[0]
            panels[name] = (keys[0], f"{stage}/true_utility")
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.2), squeeze=False)
    for ax, (name, (dis, true)) in zip(axes.flat, panels.items()):
        rows = runs[name]
        pts = [(r["step"], r[dis]) for r in rows if isinstance(r.get(dis), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", c="C3", lw=1.2, ms=3, label=dis)
        ax.set_ylabel("ensemble disagreement (mean std)", fontsize=8, color="C3")
        pts = [(r["step"], r[true]) for r in rows if isinstance(r.get(true), (int, float))]
        if pts:
            twin = ax.twinx()
            twin.plot([p[0] for p in pts], [p[1] for p in pts], "s-", c="C0", lw=1.2, ms=3, label=true)
            twin.set_ylabel("true utility of the samples", fontsize=8, color="C0")
            twin.tick_params(labelsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def frontier(evaluation: dict | None, sweep: dict | None):
    """True utility (with 95% CI) and proxy reward of each policy against its KL to the reference."""
    if not evaluation and not sweep:
        return None
    fig, ax = plt.subplots(figsize=(6.2, 4))
    if sweep:
        pts = sweep["points"]
        ax.scatter([p["kl"] for p in pts], [p["true_utility"] for p in pts], c="0.7", s=14, label="sweep runs (true)")
    if evaluation:
        for name, r in evaluation["policies"].items():
            label = f"{name}{' (KL bound)' if r.get('kl_is_bound') else ''}"
            if "true_utility" in r:  # (not on the user's own prompts: only the world knows the truth)
                u = r["true_utility"]
                ax.errorbar(
                    [r["kl"]],
                    [u["mean"]],
                    yerr=[[u["mean"] - u["low"]], [u["high"] - u["mean"]]],
                    fmt="o",
                    capsize=3,
                    label=label,
                )
                label = None
            if "proxy_reward" in r:
                ax.scatter(
                    [r["kl"]],
                    [r["proxy_reward"]["mean"]],
                    marker="x",
                    c="k" if label is None else None,
                    s=20,
                    label=label,
                )
    ax.set_xlabel("KL to the reference (nats per response)")
    ax.set_ylabel("true utility (o, 95% CI); proxy reward (x)")
    ax.axhline(0, c="0.85", lw=0.8)
    ax.legend(fontsize=7)
    return fig


def true_vs_proxy(sweep: dict | None):
    """Per sweep arm: true and proxy reward gain against sqrt(KL), the Gao et al. fit and its peak."""
    if not sweep or not sweep.get("points"):
        return None
    from preflab.evaluate.stats import GaoFit

    base = sweep["reference"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (arm, fit) in enumerate(sweep["fits"].items()):
        color = f"C{i}"
        pts = sorted((p for p in sweep["points"] if p["arm"] == arm), key=lambda p: p["sqrt_kl"])
        d = [0.0] + [p["sqrt_kl"] for p in pts]
        ax1.plot(d, [0.0] + [p["true_utility"] - base["true_utility"] for p in pts], "o-", c=color, label=arm)
        ax2.plot(d, [0.0] + [p["proxy"] - base["proxy"] for p in pts], "s--", c=color, label=arm)
        g = GaoFit("rl", fit["a"], fit["b"], fit["d_star"] or math.inf, fit["r_star"] or math.nan, fit["rmse"])
        grid = np.linspace(1e-3, max(d) * 1.05 + 1e-3, 100)
        ax1.plot(grid, g.predict(grid), c=color, lw=0.8, alpha=0.6)
        if fit["d_star"] is not None and fit["d_star"] <= max(d) * 1.5:
            ax1.axvline(fit["d_star"], c=color, ls=":", lw=1)
        best = fit["best_measured"]
        ax1.scatter(
            [best["sqrt_kl"]],
            [best["true_utility"] - base["true_utility"]],
            marker="*",
            s=120,
            c=color,
            edgecolors="k",
            zorder=5,
        )
    ax1.set_title("true utility gain (line: Gao fit, dotted: fitted peak, star: best run)", fontsize=8)
    ax2.set_title("proxy reward gain", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xlabel("sqrt(KL to the reference)")
        ax.axhline(0, c="0.85", lw=0.8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def length_drift(evaluation: dict | None, sweep: dict | None):
    """Mean response length per policy, and along the sweep against sqrt(KL)."""
    if not evaluation and not sweep:
        return None
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(10 if sweep else 5.5, 3.5), squeeze=False)
    if evaluation:
        names = list(evaluation["policies"])
        axes[0, 0].bar(names, [evaluation["policies"][n]["mean_length"] for n in names], color="C0")
        axes[0, 0].set_ylabel("mean length (tokens)")
        axes[0, 0].set_title("length by policy (held-out prompts)", fontsize=9)
        axes[0, 0].tick_params(axis="x", labelsize=7, rotation=20)
    if sweep:
        ax = axes[0, -1]
        base = sweep["reference"]["length"]
        for i, arm in enumerate(sweep["fits"]):
            pts = sorted((p for p in sweep["points"] if p["arm"] == arm), key=lambda p: p["sqrt_kl"])
            ax.plot([0] + [p["sqrt_kl"] for p in pts], [base] + [p["length"] for p in pts], "o-", c=f"C{i}", label=arm)
        ax.set_xlabel("sqrt(KL to the reference)")
        ax.set_ylabel("mean length (tokens)")
        ax.set_title("length drift in the sweep", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def calibration_table(samples: list[dict], reference: str, bins: int = 5) -> list[dict]:
    """Reward-model calibration against the truth: for each (policy, reference) pair of responses to one prompt,
    the predicted P(policy better) = sigmoid(proxy difference) against the true-utility outcome (ties half)."""
    by_prompt: dict = {}
    for s in samples:
        by_prompt.setdefault(s["policy"], []).append(s)
    ref = by_prompt.get(reference)
    if not ref or ref[0].get("proxy") is None:
        return []
    pred, outcome = [], []
    for name, rows in by_prompt.items():
        if name == reference or len(rows) != len(ref):
            continue
        for a, b in zip(rows, ref):
            if a.get("utility") is None or b.get("utility") is None:
                continue  # the user's own prompts: no truth to calibrate against
            if a["utility"] == b["utility"] and a["response"] == b["response"]:
                continue
            pred.append(1 / (1 + math.exp(-(a["proxy"] - b["proxy"]))))
            outcome.append(1.0 if a["utility"] > b["utility"] else 0.5 if a["utility"] == b["utility"] else 0.0)
    if not pred:
        return []
    pred, outcome = np.array(pred), np.array(outcome)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(pred, edges) - 1, 0, bins - 1)
    return [
        {
            "bin": f"{edges[k]:.1f}-{edges[k + 1]:.1f}",
            "n": int((idx == k).sum()),
            "predicted": float(pred[idx == k].mean()),
            "observed": float(outcome[idx == k].mean()),
        }
        for k in range(bins)
        if (idx == k).any()
    ]


def calibration(table: list[dict]):
    if not table:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], c="0.7", ls="--", lw=1)
    ax.plot([r["predicted"] for r in table], [r["observed"] for r in table], "o-")
    for r in table:
        ax.annotate(str(r["n"]), (r["predicted"], r["observed"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("reward model: sigmoid(r_policy - r_reference)")
    ax.set_ylabel("true utility: P(policy better)")
    ax.set_title("reward-model calibration on policy samples", fontsize=9)
    return fig


# ---- the oversight section (`preflab demo --oversight true`) ------------------------------------------------------


def _yerr(entries: list[dict]) -> list[list[float]]:
    """Asymmetric error bars from {mean, low, high} (0 where an end is not a number)."""

    def gap(a, b):
        return a - b if math.isfinite(a) and math.isfinite(b) else 0.0

    return [[gap(e["mean"], e["low"]) for e in entries], [gap(e["high"], e["mean"]) for e in entries]]


def shift_accuracy(shift: dict | None):
    """`eval shift`: the reward model's pairwise accuracy against the true utility per pair set, 95% CI bars."""
    if not shift or not shift.get("sets"):
        return None
    from preflab.evaluate.shift import SETS

    names = [n for n in SETS if n in shift["sets"]]
    entries = [shift["sets"][n]["accuracy"] for n in names]
    labels = [f"{SETS[n].split(' (')[0]}\n({shift['sets'][n]['counted']} pairs)" for n in names]
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    ax.bar(labels, [e["mean"] for e in entries], color=[f"C{i}" for i in range(len(names))], alpha=0.8)
    ax.errorbar(labels, [e["mean"] for e in entries], yerr=_yerr(entries), fmt="none", ecolor="k", capsize=4)
    ax.axhline(0.5, c="0.6", ls="--", lw=0.8, label="chance")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy against the true utility (95% CI)")
    alarm = shift["members"] > 1
    ax.set_title(
        f"reward model ({shift['members']} member{'s' if alarm else ''}"
        + (f"; left out: {shift['left_out']}" if shift.get("left_out") else "")
        + ")",
        fontsize=9,
    )
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def oversight_recovery(oversight: dict | None):
    """`eval oversight`: the share of lost true utility the aid recovers against its recall (95% CI), and the bluff
    rate of each arm's best-of-n on the questions the limited raters could not verify."""
    if not oversight or not oversight.get("recovered"):
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    # Only the questions the raters could not verify: elsewhere nothing much is lost, U_full - U_limited is near 0
    # and the share's interval is noise (oversight.json has every split).
    rec = oversight["recovered"]["unverified"]
    recalls = sorted(rec, key=float)
    entries = [rec[r] for r in recalls]
    ax1.errorbar(
        [0.0] + [float(r) for r in recalls],
        [0.0] + [e["mean"] for e in entries],
        yerr=[[0.0] + g for g in _yerr(entries)],
        fmt="o-",
        capsize=3,
        label="questions the raters could not verify (recall 0: 0 by definition)",
    )
    if not any(math.isfinite(e["mean"]) for e in entries):
        ax1.text(
            0.5,
            0.5,
            "undefined: no true utility was lost\n(U_full = U_limited)",
            ha="center",
            fontsize=8,
            transform=ax1.transAxes,
        )
    ax1.axhline(0, c="0.6", lw=0.8)
    ax1.axhline(1, c="0.6", ls="--", lw=0.8)
    ax1.set_xlim(-0.05, 1.1)
    ax1.set_xlabel("aid recall")
    ax1.set_ylabel("lost true utility recovered (95% CI)")
    ax1.set_title("(U_aid - U_limited) / (U_full - U_limited)", fontsize=9)
    ax1.legend(fontsize=7)
    table = oversight["table"]["unverified"]
    arms = [a for a in table if a != "prompts"]
    entries = [table[a]["bluff_rate"] for a in arms]
    ax2.bar(arms, [e["mean"] for e in entries], color=["0.6"] + [f"C{i}" for i in range(len(arms) - 1)], alpha=0.8)
    ax2.errorbar(arms, [e["mean"] for e in entries], yerr=_yerr(entries), fmt="none", ecolor="k", capsize=4)
    ax2.set_ylabel("bluff rate (95% CI)")
    ax2.set_title(
        f"confident wrong answers, best-of-n per vote set ({table['prompts']} unverifiable questions)", fontsize=8
    )
    ax2.tick_params(axis="x", labelsize=8, rotation=15)
    fig.tight_layout()
    return fig
