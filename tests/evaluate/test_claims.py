"""The lesson's claims hold exactly when their intervals say so, and a failed claim is reported, not dropped."""

from __future__ import annotations

import numpy as np

from preflab.evaluate.claims import all_claims, bias_claims, format_claims, policy_claims, sweep_claims


def est(mean, low, high):
    return {"mean": mean, "low": low, "high": high, "n": 200}


def test_policy_claims_read_the_lower_end_of_each_interval():
    ev = {
        "policies": {
            "sft": {},
            "ppo": {"gain": est(0.2, 0.01, 0.4), "right_answer_gain": est(-0.02, -0.1, 0.05)},
            "dpo": {"gain": est(0.4, 0.2, 0.6), "right_answer_gain": est(0.1, 0.03, 0.17)},
        }
    }
    holds = {c["claim"]: c["holds"] for c in policy_claims(ev)}
    assert holds == {
        "PPO beats SFT on true utility": True,
        "PPO gains right answers (not only hedges)": False,
        "DPO gains right answers": True,
    }
    missing = policy_claims({"policies": {"sft": {}}})
    assert [c["holds"] for c in missing] == [None, None, None]


def test_length_bias_claim():
    assert bias_claims({"length_bias": 0.04, "length_bias_low": 0.02, "length_bias_high": 0.06})[0]["holds"] is True
    assert bias_claims({"length_bias": 0.01, "length_bias_low": -0.01, "length_bias_high": 0.03})[0]["holds"] is False


def point(arm, steps, utilities, proxies):
    return {
        "arm": arm,
        "steps": steps,
        "true_utility": float(np.mean(utilities)),
        "proxy": float(np.mean(proxies)),
        "utilities": list(utilities),
        "proxies": list(proxies),
    }


def test_sweep_claims_need_a_rise_in_proxy_and_a_fall_in_truth():
    rng = np.random.default_rng(0)
    noise = lambda: rng.normal(0, 0.05, 100)  # noqa: E731
    hacked = [
        point("beta=0", 5, 0.0 + noise(), 0.0 + noise()),
        point("beta=0", 10, 0.5 + noise(), 0.5 + noise()),
        point("beta=0", 20, 0.1 + noise(), 1.0 + noise()),
    ]
    held = [point("beta=0.2", s, 0.4 + noise(), 0.3 + noise()) for s in (5, 10, 20)]
    claims = {c["claim"]: c for c in sweep_claims({"points": hacked + held})}
    hacking = claims["without a KL penalty the proxy keeps rising while the true utility falls"]
    assert hacking["holds"] is True and "step 10 - step 20" in hacking["evidence"]
    assert claims["a larger beta (or a reward ensemble) holds the true utility"]["holds"] is True
    # truth rising to the end: no hacking, and beta=0 ends above the other arm
    honest = [point("beta=0", s, u + noise(), u + noise()) for s, u in ((5, 0.0), (10, 0.5), (20, 1.0))]
    claims = {c["claim"]: c["holds"] for c in sweep_claims({"points": honest + held})}
    assert claims == {
        "without a KL penalty the proxy keeps rising while the true utility falls": False,
        "a larger beta (or a reward ensemble) holds the true utility": False,
    }


def test_all_claims_are_printed_with_their_verdict():
    ev = {"policies": {"ppo": {"gain": est(0.2, 0.01, 0.4), "right_answer_gain": est(0.0, -0.1, 0.1)}}}
    bias = {"length_bias": 0.04, "length_bias_low": 0.02, "length_bias_high": 0.06}
    text = format_claims(all_claims(ev, bias, None))
    assert "[HOLDS ] PPO beats SFT" in text and "[FAILED] PPO gains right answers" in text
    assert "[n/a   ] DPO gains right answers: not measured" in text
