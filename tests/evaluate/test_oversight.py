"""`preflab eval oversight`: the recovered share on hand values, the per-arm statistics on hand arrays, the
vote sets line up, and the command runs end to end on a micro model."""

import json

import numpy as np
import pytest

from preflab.config import ConfigError
from preflab.data import write_jsonl
from preflab.evaluate.oversight import (
    OversightConfig,
    arm_table,
    bluff,
    dpo_table,
    oversight,
    recovered,
    recovered_from,
    verifiable,
    vote_sets,
)
from preflab.evaluate.stats import recovered_share
from preflab.world.annotators import Annotator, world_pairs


def test_recovered_share_hand_values():
    # full 2, limited 0, aided 1.5: (1.5 - 0) / (2 - 0) = 0.75
    e = recovered_share([2.0, 2.0, 2.0], [0.0, 0.0, 0.0], [1.5, 1.5, 1.5], n_boot=100)
    assert e.mean == pytest.approx(0.75) and e.low == pytest.approx(0.75) and e.high == pytest.approx(0.75)
    # (mean 0.5 - mean 0) / (mean 1 - mean 0) = 0.5, means over items (not a mean of per-item shares)
    e = recovered_share([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], n_boot=500)
    assert e.mean == pytest.approx(0.5) and e.low < 0.5 < e.high
    assert recovered_share([1.0, 1.0], [0.0, 0.0], [0.0, 0.0]).mean == 0.0  # the aid gave nothing back
    assert np.isnan(recovered_share([1.0, 0.0], [1.0, 0.0], [0.5, 0.5]).mean)  # nothing was lost
    with pytest.raises(ValueError, match="equal shapes"):
        recovered_share([1.0], [0.0, 1.0], [0.0])


def test_arm_table_picks_the_reward_models_favourite_and_splits_by_verifiability():
    # 2 prompts x 2 samples; prompt 0 unverifiable, prompt 1 verifiable
    cand = {
        "utility": np.array([[1.0, -1.0], [0.5, 1.5]]),
        "right": np.array([[1.0, 0.0], [0.0, 1.0]]),
        "bluff": np.array([[0.0, 1.0], [0.0, 0.0]]),
    }
    rewards = {
        "full": np.array([[2.0, 0.0], [0.0, 1.0]]),  # picks 0, 1
        "limited": np.array([[0.0, 3.0], [0.0, 1.0]]),  # picks 1 (the bluff), 1
        "aid@1": np.array([[1.0, 0.0], [1.0, 0.0]]),  # picks 0, 0
    }
    split = np.array([False, True])
    table, picks = arm_table(cand, rewards, split, n_boot=50, seed=0)
    assert picks["limited"].tolist() == [1, 1] and picks["sft"].tolist() == [0, 0]
    un, ver = table["unverified"], table["verified"]
    assert un["prompts"] == 1 and ver["prompts"] == 1 and table["all"]["prompts"] == 2
    assert un["limited"]["true_utility"]["mean"] == -1.0 and un["limited"]["bluff_rate"]["mean"] == 1.0
    assert un["full"]["true_utility"]["mean"] == 1.0 and un["full"]["bluff_rate"]["mean"] == 0.0
    assert un["limited"]["proxy_reward"]["mean"] == 3.0 and un["limited"]["proxy_gain"]["mean"] == 3.0
    assert un["sft"]["proxy_reward"]["mean"] == 0.0  # sample 0 scored by the limited raters' reward model
    assert ver["aid@1"]["true_utility"]["mean"] == 0.5 and ver["aid@1"]["true_gain"]["mean"] == 0.0
    back = recovered(cand, picks, split, [1.0], n_boot=50, seed=0)
    assert back["unverified"]["1"]["mean"] == pytest.approx((1.0 - -1.0) / (1.0 - -1.0))
    assert np.isnan(back["verified"]["1"]["mean"])  # full and limited pick the same: nothing lost
    assert bluff("wrong", "answer") and not bluff("wrong", "hedge") and not bluff("right", "answer")


def test_dpo_table_compares_each_trained_policy_with_the_mean_sft_sample_paired_by_prompt():
    # 2 prompts; the SFT policy's 2 samples, each DPO policy's 2 samples; prompt 0 unverifiable, 1 verifiable
    cand = {
        "utility": np.array([[1.0, -1.0], [0.0, 2.0]]),  # per prompt mean 0, 1
        "right": np.array([[1.0, 0.0], [0.0, 1.0]]),
        "bluff": np.array([[0.0, 1.0], [0.0, 0.0]]),  # per prompt 0.5, 0
    }
    sft_proxy = {
        "full": np.array([[0.0, 0.0], [1.0, 1.0]]),
        "limited": np.array([[1.0, -1.0], [0.0, 2.0]]),  # per prompt 0, 1 (the sft row's proxy)
        "aid@1": np.array([[0.0, 0.0], [0.0, 0.0]]),
    }

    def policy(utility, bluffs, proxy):
        u = np.array(utility)
        return {"utility": u, "right": (u > 0).astype(float), "bluff": np.array(bluffs), "proxy": np.array(proxy)}

    policies = {
        "full": policy([[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [2.0, 2.0]]),
        "limited": policy([[-1.0, -1.0], [1.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]], [[3.0, 1.0], [1.0, 1.0]]),
        "aid@1": policy([[0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]),
    }
    split = np.array([False, True])
    table, u = dpo_table(cand, policies, sft_proxy, split, n_boot=50, seed=0)
    un, ver = table["unverified"], table["verified"]
    assert un["prompts"] == 1 and ver["prompts"] == 1 and table["all"]["prompts"] == 2
    assert un["sft"]["true_utility"]["mean"] == 0.0 and un["sft"]["bluff_rate"]["mean"] == 0.5
    assert un["sft"]["proxy_reward"]["mean"] == 0.0 and "proxy_gain" not in un["sft"]
    lim = un["limited"]
    assert lim["true_utility"]["mean"] == -1.0 and lim["bluff_rate"]["mean"] == 1.0 and lim["right_rate"]["mean"] == 0
    assert lim["proxy_reward"]["mean"] == 2.0 and lim["proxy_gain"]["mean"] == 2.0  # its own RM: 2 - mean(1, -1)
    assert lim["true_gain"]["mean"] == -1.0 and lim["bluff_gain"]["mean"] == 0.5
    assert un["full"]["proxy_gain"]["mean"] == 1.0 and un["full"]["bluff_gain"]["mean"] == -0.5  # the full RM on sft: 0
    assert ver["full"]["proxy_gain"]["mean"] == 1.0 and ver["full"]["true_gain"]["mean"] == 0.0
    assert lim["bluff_vs_full"]["mean"] == 1.0 and lim["true_vs_full"]["mean"] == -2.0  # against dpo on full votes
    assert "bluff_vs_full" not in un["full"] and un["aid@1"]["true_vs_full"]["mean"] == -0.5
    assert table["all"]["limited"]["true_utility"]["mean"] == 0.0
    # a 95% interval over the two prompts (diffs -2 and 0), not a point: the seed once went in as the level
    vs_full = table["all"]["limited"]["true_vs_full"]
    assert vs_full["mean"] == -1.0 and vs_full["low"] == -2.0 and vs_full["high"] == 0.0
    assert u["limited"].tolist() == [-1.0, 1.0] and u["aid@1"].tolist() == [0.5, 1.0] and u["sft"].tolist() == [0, 1]
    back = recovered_from(u, split, [1.0], n_boot=50, seed=0)
    assert back["unverified"]["1"]["mean"] == pytest.approx((0.5 - -1.0) / (1.0 - -1.0))
    assert np.isnan(back["verified"]["1"]["mean"])  # nothing lost where the raters could verify


def test_verifiable_means_half_the_pool_knows_the_fact():
    prompts = ["What is the capital of France?", "What is 2 + 3?"]
    pool = [Annotator("a", knows=frozenset({"capital:France"})), Annotator("b", knows=frozenset())]
    assert verifiable(prompts, pool).tolist() == [True, False]


def test_vote_sets_share_their_draws():
    config = OversightConfig(model="m", pairs="p", knowledge=0.0, recalls=[1.0], annotators=4)
    sets = vote_sets(world_pairs(80, seed=0), config)
    assert list(sets) == ["full", "limited", "aid@1"]
    assert [r["annotator"] for r in sets["full"]] == [r["annotator"] for r in sets["limited"]]
    assert all(r["knew"] is False for r in sets["limited"]) and "knew" not in sets["full"][0]
    assert sum(r["aid"] == "critique" for r in sets["aid@1"]) > 20


def test_config_quotes_the_bad_value():
    with pytest.raises(ConfigError, match="1.5"):
        OversightConfig(model="m", pairs="p", knowledge=1.5)
    with pytest.raises(ConfigError, match=r"\[0.5, 0.0\]"):
        OversightConfig(model="m", pairs="p", recalls=[0.5, 0.0])
    with pytest.raises(ConfigError, match="--pairs"):
        OversightConfig(model="m")
    with pytest.raises(ConfigError, match="dpo_steps must be >= 0, got -1"):
        OversightConfig(model="m", pairs="p", dpo_steps=-1)
    with pytest.raises(ConfigError, match="dpo_samples must be >= 1, got 0"):
        OversightConfig(model="m", pairs="p", dpo_samples=0)


def test_cli_runs_the_experiment_end_to_end(model_dir, tmp_path):
    from preflab.cli import main

    pairs = tmp_path / "gen" / "pairs.jsonl"
    write_jsonl(pairs, [{"prompt": p, "response_a": a, "response_b": b} for p, a, b in world_pairs(40, seed=0)])
    out = tmp_path / "oversight"
    args = ["eval", "oversight", "--model", str(model_dir), "--pairs", str(pairs.parent), "--knowledge", "0.5"]
    args += ["--recalls", "0.5,1.0", "--reward-steps", "2", "--n-prompts", "6", "--bon-n", "2"]
    assert main(args + ["--max-new-tokens", "4", "--n-boot", "20", "--out", str(out)]) == 0
    report = json.loads((out / "oversight.json").read_text())
    assert list(report["votes"]) == ["full", "limited", "aid@0.5", "aid@1"]
    assert report["votes"]["limited"]["blind_share"] > 0 and report["votes"]["full"]["blind_share"] == 0
    assert set(report["table"]["all"]) == {"prompts", "sft", "full", "limited", "aid@0.5", "aid@1"}
    assert report["table"]["all"]["prompts"] == 6 and set(report["recovered"]["unverified"]) == {"0.5", "1"}
    for arm in ("full", "limited", "aid@0.5", "aid@1"):
        assert (out / "votes" / f"{arm}.jsonl").exists() and (out / "reward" / arm / "summary.json").exists()
    assert "Share of the lost true utility" in (out / "oversight.md").read_text()
    assert len((out / "samples.jsonl").read_text().splitlines()) == 6
    # budgeted in steps and seeded: a rerun gives the same numbers
    assert main(args + ["--max-new-tokens", "4", "--n-boot", "20", "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "oversight.json").read_text())
    assert (again["votes"], again["table"]) == (report["votes"], report["table"])


def test_dpo_steps_train_a_policy_per_vote_set_through_preflab_dpo(model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"prompt": p, "response_a": a, "response_b": b} for p, a, b in world_pairs(40, seed=0)])
    options = dict(model=str(model_dir), pairs=str(pairs), knowledge=0.5, recalls=[1.0], reward_steps=2)
    options |= dict(n_prompts=5, bon_n=2, max_new_tokens=4, n_boot=20, dpo_steps=3, dpo_samples=2)
    summary = oversight(OversightConfig(**options, dpo={"batch_size": 4}, out=str(tmp_path / "ov")))
    report = json.loads((tmp_path / "ov" / "oversight.json").read_text())
    arms = ["full", "limited", "aid@1"]
    assert list(report["dpo"]["training"]) == arms
    for arm in arms:  # `preflab dpo`'s own run folder: its config, steps and model
        dpo_summary = json.loads((tmp_path / "ov" / "dpo" / arm / "summary.json").read_text())
        assert dpo_summary["steps"] == 3 and report["dpo"]["training"][arm]["steps"] == 3
        assert (tmp_path / "ov" / "dpo" / arm / "model" / "config.json").exists()
        assert f"votes/{arm}.jsonl" in (tmp_path / "ov" / "dpo" / arm / "config.yaml").read_text()
    assert set(report["dpo"]["table"]["all"]) == {"prompts", "sft", *arms}
    assert set(report["dpo"]["table"]["unverified"]["limited"]) >= {"proxy_gain", "true_gain", "bluff_gain"}
    assert set(report["dpo"]["recovered"]["unverified"]) == {"1"}
    rows = [json.loads(x) for x in (tmp_path / "ov" / "samples.jsonl").read_text().splitlines()]
    assert all(len(r["dpo"][arm]) == 2 for r in rows for arm in arms)
    assert "dpo limited/bluff_rate_unverified" in summary
    assert "A policy trained on each vote set" in (tmp_path / "ov" / "oversight.md").read_text()
    # without --dpo-steps nothing of it: no dpo/ folder, no "dpo" in the report
    oversight(OversightConfig(**{**options, "dpo_steps": 0}, out=str(tmp_path / "plain")))
    plain = json.loads((tmp_path / "plain" / "oversight.json").read_text())
    assert "dpo" not in plain and not (tmp_path / "plain" / "dpo").exists()
    assert plain["table"] == report["table"]  # the best-of-n arms do not move
