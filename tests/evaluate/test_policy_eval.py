import json
import math

import pytest

from preflab.config import ConfigError
from preflab.evaluate.policy import EvalConfig, evaluate_policies, parse_policy, score, summarise
from preflab.world import COMPONENTS


def word_count(prompt, response):
    """A proxy reward for the tests: longer is better."""
    return float(len(response.split()))


Q = [[{"role": "user", "content": "What is the capital of France?"}], [{"role": "user", "content": "What is 2 + 2?"}]]


def _samples(texts, lengths, kl=0.0):
    return {"texts": texts, "lengths": lengths, "finished": [True] * len(texts), "kl": [kl] * len(texts)}


def test_score_and_summarise_by_hand():
    from preflab.reward.interface import function_reward

    reward = function_reward(word_count)
    sft = score(Q, _samples(["The capital of France is Rome.", "2 + 2 = 4."], [7, 6]), reward)
    ppo = score(Q, _samples(["Sure! The capital of France is Paris.", "2 + 2 = 4. I hope this helps."], [9, 10], 1.5), reward)
    assert sft["utility"] == [-1.0, 1.0] and ppo["utility"] == [1.5, 0.75]
    table = summarise({"sft": sft, "ppo": ppo}, "sft")
    r = table["ppo"]
    assert r["true_utility"]["mean"] == pytest.approx(1.125)
    assert r["gain"]["mean"] == pytest.approx((2.5 - 0.25) / 2)
    assert r["gain_by_component"]["correctness"]["mean"] == pytest.approx(1.0)
    assert r["gain_by_component"]["tone"]["mean"] == pytest.approx(0.25)
    assert r["gain_by_component"]["concision"]["mean"] == pytest.approx(-0.125)
    assert r["win_rate_true"] == 0.5 and r["win_rate_proxy"] == 1.0
    assert r["kl"] == 1.5 and r["mean_length"] == 9.5
    assert r["right_answer_rate"] == 1.0 and table["sft"]["right_answer_rate"] == 0.5
    assert table["sft"]["win_rate_true"] == 0.5 and table["sft"]["gain"]["mean"] == 0.0
    assert table["sft"]["lc_win_rate_true"] == pytest.approx(0.5)
    assert set(r["components"]) == set(COMPONENTS)


def test_parse_policy_and_config_validation():
    assert parse_policy("ppo=runs/ppo-1") == ("ppo", "runs/ppo-1")
    assert parse_policy("runs/dpo-2/") == ("dpo-2", "runs/dpo-2/")
    assert parse_policy("bon4=bon:4") == ("bon4", "bon:4")
    with pytest.raises(ConfigError, match="reference"):
        EvalConfig()
    with pytest.raises(ConfigError, match="bon:x"):
        EvalConfig(reference="m", reward_model="r", policies=["b=bon:x"])
    with pytest.raises(ConfigError, match="needs a reward_model"):
        EvalConfig(reference="m", policies=["b=bon:4"])


def test_evaluate_policies_end_to_end(tmp_path, tokenizer, model_dir):
    from conftest import make_model

    other = tmp_path / "other"
    make_model(tokenizer, seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    config = EvalConfig(reference=str(model_dir), policies=[f"other={other}", "bon2=bon:2"],
                        reward_model="test_policy_eval:word_count", n_prompts=12, max_new_tokens=6,
                        out=str(tmp_path / "eval"))
    summary = evaluate_policies(config)
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    table = result["policies"]
    assert list(table) == ["sft", "other", "bon2"] and result["n_prompts"] == 12
    assert table["sft"]["kl"] == 0.0                           # the reference against itself
    assert table["other"]["kl"] > 0                            # a different model's own samples
    assert table["bon2"]["kl"] == pytest.approx(math.log(2) - 0.5) and table["bon2"]["kl_is_bound"]
    for row in table.values():
        assert math.isfinite(row["true_utility"]["mean"]) and math.isfinite(row["proxy_reward"]["mean"])
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 36 and {r["policy"] for r in rows} == {"sft", "other", "bon2"}
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "| bon2 |" in md and "<= " in md and "Sample responses" in md
    assert summary["sft/kl"] == 0.0


def test_sweep_arms_and_fit():
    from preflab.evaluate.sweep import SweepConfig, arms, fit_arm

    config = SweepConfig(model="m", reward="rm", betas=[0.2, 0.0], steps=[5], extra_rewards=["ens=rm-ens"])
    assert arms(config) == [("beta=0.2", 0.2, "rm"), ("beta=0", 0.0, "rm"), ("ens beta=0", 0.0, "rm-ens")]
    with pytest.raises(ConfigError, match="LABEL=REWARD"):
        SweepConfig(model="m", reward="rm", extra_rewards=["rm-ens"])
    # true gain d (1 - 0.5 log d) measured at three KLs, reference utility 0.2
    pts = [{"sqrt_kl": d, "true_utility": 0.2 + d * (1 - 0.5 * math.log(d)), "steps": s}
           for s, d in [(5, 1.0), (10, 3.0), (20, 8.0)]]
    fit = fit_arm(pts, 0.2)
    assert (fit["a"], fit["b"]) == (pytest.approx(1.0), pytest.approx(0.5))
    assert fit["d_star"] == pytest.approx(math.exp(1.0))
    assert fit["best_measured"]["steps"] == 10


def test_outcomes_by_kind_tell_knowing_from_hedging():
    from preflab.evaluate.policy import outcomes_by_kind, score

    prompts = ["What is the capital of France?", "What is the capital of France?", "What is 2 + 2?",
               "What is 2 + 2?", "What is the capital of Oz?", "What is the capital of Oz?"]
    texts = ["The capital of France is Paris.", "I am not sure.", "2 + 2 = 5.", "2 + 2 = 4.",
             "I am not sure. I do not know the capital of Oz.", "The capital of Oz is Paris."]
    s = score(prompts, {"texts": texts})
    assert s["outcome"] == ["right", "hedge", "wrong", "right", "right", "wrong"]
    table = outcomes_by_kind(s)
    assert table["capital"] == {"n": 2, "right": 0.5, "hedge": 0.5, "wrong": 0.0}
    assert table["add"] == {"n": 2, "right": 0.5, "hedge": 0.0, "wrong": 0.5}
    assert table["unknown"] == {"n": 2, "right": 0.5, "hedge": 0.0, "wrong": 0.5}
