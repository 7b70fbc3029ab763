"""`preflab eval oversight`: the recovered share on hand values, the per-arm statistics on hand arrays, the
vote sets line up, and the command runs end to end on a micro model."""

import json

import numpy as np
import pytest

from preflab.config import ConfigError
from preflab.data import write_jsonl
from preflab.evaluate.oversight import OversightConfig, arm_table, bluff, recovered, verifiable, vote_sets
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
