"""The lesson's claims, each stated only when its interval supports it.

The demo measures everything against the world's known true utility; these functions turn the measurements
into the sentences the lesson makes, each with the evidence (a 95% interval) that decides it. A claim whose
interval does not support it is reported as failed, never dropped.

    PPO beats SFT on true utility                    paired gain over the SFT policy, CI above 0
    PPO gains right answers (not only hedges)        paired gain in the right-answer rate, CI above 0
    DPO gains right answers                          the same for DPO
    the planted length bias is found                 the bias audit's length coefficient, CI above 0
    without a KL penalty the proxy keeps rising      on the beta=0 sweep arm: the proxy at the longest run above
      while the true utility falls                   the first point, and the true utility at the longest run
                                                     below the arm's best point (both paired over prompts)
    a larger beta (or a reward ensemble) holds       at the longest run, the largest-beta arm (or the ensemble
      the true utility                               arm) above the beta=0 arm on true utility (paired)
"""

from __future__ import annotations

from preflab.evaluate.stats import paired_difference


def _ci(est: dict) -> str:
    return f"{est['mean']:+.3f} [{est['low']:+.3f}, {est['high']:+.3f}]"


def claim(text: str, est: dict | None, evidence: str = "") -> dict:
    """A claim that holds when `est`'s 95% interval lies above 0 (None: not measured in this run)."""
    if est is None:
        return {"claim": text, "holds": None, "evidence": evidence or "not measured in this run"}
    return {"claim": text, "holds": bool(est["low"] > 0), "evidence": evidence or _ci(est)}


def policy_claims(ev: dict) -> list[dict]:
    """Claims on the eval of policies against the SFT reference (eval.json's `policies`)."""
    policies = ev["policies"]
    out = []
    ppo, dpo = policies.get("ppo"), policies.get("dpo")
    out.append(claim("PPO beats SFT on true utility", ppo and ppo["gain"], ppo and f"gain {_ci(ppo['gain'])}"))
    out.append(
        claim(
            "PPO gains right answers (not only hedges)",
            ppo and ppo.get("right_answer_gain"),
            ppo and f"right-answer rate {_ci(ppo['right_answer_gain'])}",
        )
    )
    out.append(
        claim(
            "DPO gains right answers",
            dpo and dpo.get("right_answer_gain"),
            dpo and f"right-answer rate {_ci(dpo['right_answer_gain'])}",
        )
    )
    return out


def bias_claims(bias: dict) -> list[dict]:
    est = {"mean": bias["length_bias"], "low": bias["length_bias_low"], "high": bias["length_bias_high"]}
    return [claim("the planted length bias is found", est, f"length coefficient {_ci(est)} per word")]


def _arm(points: list[dict], label: str) -> list[dict]:
    return sorted((p for p in points if p["arm"] == label), key=lambda p: p["steps"])


def sweep_claims(sweep: dict, seed: int = 0) -> list[dict]:
    """Claims on the over-optimisation sweep (sweep.json with per-prompt `utilities` and `proxies`)."""
    points = sweep["points"]
    labels = list(dict.fromkeys(p["arm"] for p in points))
    free = next((lb for lb in labels if lb == "beta=0"), None)
    hacking = claim("without a KL penalty the proxy keeps rising while the true utility falls", None)
    holds = claim("a larger beta (or a reward ensemble) holds the true utility", None)
    if free is None or len(_arm(points, free)) < 2:
        return [hacking, holds]
    arm = _arm(points, free)
    first, last = arm[0], arm[-1]
    best = max(arm[:-1], key=lambda p: p["true_utility"])
    rise = paired_difference(last["proxies"], first["proxies"], seed=seed).as_dict()
    fall = paired_difference(best["utilities"], last["utilities"], seed=seed).as_dict()
    hacking = {
        "claim": hacking["claim"],
        "holds": bool(rise["low"] > 0 and fall["low"] > 0),
        "evidence": f"beta=0: proxy step {last['steps']} - step {first['steps']} {_ci(rise)}; true utility "
        f"step {best['steps']} - step {last['steps']} {_ci(fall)}",
    }
    others = [lb for lb in labels if lb != free]
    if others:
        results = []
        for label in others:
            other_last = _arm(points, label)[-1]
            diff = paired_difference(other_last["utilities"], last["utilities"], seed=seed).as_dict()
            results.append((label, diff))
        label, diff = max(results, key=lambda r: r[1]["low"])
        holds = {
            "claim": holds["claim"],
            "holds": bool(diff["low"] > 0),
            "evidence": "; ".join(f"{lb} - beta=0 at step {last['steps']}: {_ci(d)}" for lb, d in results),
        }
    return [hacking, holds]


def all_claims(ev: dict, bias: dict, sweep: dict | None, seed: int = 0) -> list[dict]:
    out = policy_claims(ev) + bias_claims(bias)
    if sweep is not None:
        out += sweep_claims(sweep, seed)
    return out


def format_claims(claims: list[dict]) -> str:
    mark = {True: "HOLDS ", False: "FAILED", None: "n/a   "}
    return "\n".join(f"  [{mark[c['holds']]}] {c['claim']}: {c['evidence']}" for c in claims)
