import json
import math

import pytest
import torch

from preflab.config import ConfigError
from preflab.data import n_words
from preflab.evaluate.policy import EvalConfig, evaluate_policies, parse_policy, score, summarise
from preflab.world import COMPONENTS


def word_count(prompt, response):
    """A proxy reward for the tests: longer is better."""
    return float(n_words(response))


Q = [[{"role": "user", "content": "What is the capital of France?"}], [{"role": "user", "content": "What is 2 + 2?"}]]


def _samples(texts, lengths, kl=0.0):
    return {"texts": texts, "lengths": lengths, "finished": [True] * len(texts), "kl": [kl] * len(texts)}


def test_score_and_summarise_by_hand():
    from preflab.reward.interface import function_reward

    reward = function_reward(word_count)
    sft = score(Q, _samples(["The capital of France is Rome.", "2 + 2 = 4."], [7, 6]), reward)
    ppo = score(
        Q, _samples(["Sure! The capital of France is Paris.", "2 + 2 = 4. I hope this helps."], [9, 10], 1.5), reward
    )
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
    peaked = make_model(tokenizer, seed=1)
    with torch.no_grad():  # sharper next-token distributions than the near-uniform reference's: a KL of whole nats,
        peaked.lm_head.weight.mul_(30)  # whose estimate from 12 samples is positive whatever the draws
    peaked.save_pretrained(other)
    tokenizer.save_pretrained(other)
    config = EvalConfig(
        reference=str(model_dir),
        policies=[f"other={other}", "bon2=bon:2"],
        reward_model="test_policy_eval:word_count",
        n_prompts=12,
        max_new_tokens=6,
        out=str(tmp_path / "eval"),
    )
    summary = evaluate_policies(config)
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    table = result["policies"]
    assert list(table) == ["sft", "other", "bon2"] and result["n_prompts"] == 12
    assert table["sft"]["kl"] == 0.0  # the reference against itself
    assert table["other"]["kl"] > 0  # a different model's own samples
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
    pts = [
        {"sqrt_kl": d, "true_utility": 0.2 + d * (1 - 0.5 * math.log(d)), "steps": s}
        for s, d in [(5, 1.0), (10, 3.0), (20, 8.0)]
    ]
    fit = fit_arm(pts, 0.2)
    assert (fit["a"], fit["b"]) == (pytest.approx(1.0), pytest.approx(0.5))
    assert fit["d_star"] == pytest.approx(math.exp(1.0))
    assert fit["best_measured"]["steps"] == 10


def test_outcomes_by_kind_tell_knowing_from_hedging():
    from preflab.evaluate.policy import outcomes_by_kind, score

    prompts = [
        "What is the capital of France?",
        "What is the capital of France?",
        "What is 2 + 2?",
        "What is 2 + 2?",
        "What is the capital of Oz?",
        "What is the capital of Oz?",
    ]
    texts = [
        "The capital of France is Paris.",
        "I am not sure.",
        "2 + 2 = 5.",
        "2 + 2 = 4.",
        "I am not sure. I do not know the capital of Oz.",
        "The capital of Oz is Paris.",
    ]
    s = score(prompts, {"texts": texts})
    assert s["outcome"] == ["right", "hedge", "wrong", "right", "right", "wrong"]
    table = outcomes_by_kind(s)
    assert table["capital"] == {"n": 2, "right": 0.5, "hedge": 0.5, "wrong": 0.0}
    assert table["add"] == {"n": 2, "right": 0.5, "hedge": 0.0, "wrong": 0.5}
    assert table["unknown"] == {"n": 2, "right": 0.5, "hedge": 0.0, "wrong": 0.5}


USER_PROMPTS = ["Write a haiku about rain.", [{"role": "user", "content": "Name three rivers."}], "Say hi."]


def test_own_prompts_summary_by_hand_has_no_true_utility():
    from preflab.evaluate.policy import eval_metrics, markdown
    from preflab.reward.interface import function_reward

    reward = function_reward(word_count)
    ref = score(USER_PROMPTS, _samples(["Rain falls.", "Nile.", "Hi."], [3, 2, 2]), reward, world=False)
    pol = score(
        USER_PROMPTS, _samples(["Soft rain on the roof.", "Nile.", "Hi there."], [6, 2, 3], 0.5), reward, world=False
    )
    assert "utility" not in pol and pol["proxy"] == [5.0, 1.0, 2.0] and ref["proxy"] == [2.0, 1.0, 1.0]
    table = summarise({"base": ref, "tuned": pol}, "base")
    r = table["tuned"]
    assert not {"true_utility", "gain", "win_rate_true", "right_answer_rate"} & set(r)
    assert r["proxy_reward"]["mean"] == pytest.approx(8 / 3)
    assert r["proxy_gain"]["mean"] == pytest.approx((3 + 0 + 1) / 3)
    assert r["win_rate_proxy"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert (r["kl"], r["mean_length"], r["eos_rate"]) == (0.5, pytest.approx(11 / 3), 1.0)
    assert eval_metrics(r) == {
        "eval/kl": 0.5,
        "eval/mean_length": pytest.approx(11 / 3),
        "eval/eos_rate": 1.0,
        "eval/proxy_reward": pytest.approx(8 / 3),
        "eval/proxy_gain": pytest.approx(4 / 3),
        "eval/win_rate_proxy": pytest.approx(2.5 / 3),
        "eval/lc_win_rate_proxy": r["lc_win_rate_proxy"],
    }
    md = markdown(table, {"base": ref, "tuned": pol}, USER_PROMPTS, "base", 2)
    assert "prompts of your own" in md and "True utility needs the built-in world (`--prompts world`)" in md
    assert "| Name three rivers. | Nile. [+1.00] | Nile. [+1.00] |" in md
    # without a reward model there is nothing but KL, length and samples, and the table says so
    bare = summarise({"base": score(USER_PROMPTS, ref, world=False)}, "base")
    assert set(bare["base"]) == {"kl", "kl_is_bound", "mean_length", "eos_rate"}
    assert "No `--reward-model` was given" in markdown(bare, {"base": ref}, USER_PROMPTS, "base", 1)


def test_eval_policy_cli_on_a_prompt_file(tmp_path, model_dir, capsys):
    from preflab.cli import main

    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in USER_PROMPTS))
    out = tmp_path / "eval"
    rc = main(
        [
            "eval",
            "policy",
            "--reference",
            str(model_dir),
            "--prompts",
            str(path),
            "--n-prompts",
            "2",
            "--reward-model",
            "test_policy_eval:word_count",
            "--max-new-tokens",
            "5",
            "--policies",
            "bon2=bon:2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert "no true utility" in capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    assert result["n_prompts"] == 2 and result["has_true_utility"] is False and result["prompts"] == str(path)
    assert list(result["policies"]) == ["sft", "bon2"]
    for row in result["policies"].values():
        assert "true_utility" not in row and math.isfinite(row["proxy_reward"]["mean"])
    assert result["policies"]["sft"]["kl"] == 0.0 and result["policies"]["sft"]["win_rate_proxy"] == 0.5
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == USER_PROMPTS[:2] * 2 and all(r["utility"] is None for r in rows)
    assert all(r["proxy"] == word_count(None, r["response"]) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert "sft/true_utility" not in summary and "sft/proxy_reward" in summary
    assert "True utility needs the built-in world" in (out / "eval.md").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    assert main(["eval", "policy", "--reference", str(model_dir), "--prompts", str(bad)]) == 2
