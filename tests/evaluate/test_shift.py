"""`preflab eval shift`: the three pair sets come from the right sources, the statistics match hand values, and
`preflab reward --exclude-kind` drops exactly the rows of that kind."""

import json

import numpy as np
import pytest
import torch

from preflab.config import ConfigError
from preflab.data import DataError, load_preferences, write_jsonl
from preflab.evaluate.shift import ShiftConfig, build_pairs, set_statistics
from preflab.world import kind_of


def test_build_pairs_draws_each_set_from_its_sources():
    responses, pairs = build_pairs(n_same=3, n_left=2, has_policy=True)
    by_set = {}
    for name, i, j in pairs:
        by_set.setdefault(name, []).append((responses[i], responses[j]))
    # a: SFT vs SFT on trained-kind prompts (0-2), the same prompt on both sides, two different samples
    assert [(a[0], b[0]) for a, b in by_set["same"]] == [("sft", "sft")] * 3
    assert sorted(a[1] for a, _ in by_set["same"]) == [0, 1, 2]
    # b: policy vs policy and policy vs SFT, trained-kind prompts only
    assert sorted((a[0], b[0]) for a, b in by_set["policy"]) == [("policy", "policy")] * 3 + [("policy", "sft")] * 3
    assert {a[1] for a, _ in by_set["policy"]} == {0, 1, 2}
    # c: SFT vs SFT on the left-out prompts (3-4) only
    assert [(a[0], b[0]) for a, b in by_set["left_out"]] == [("sft", "sft")] * 2
    assert sorted(a[1] for a, _ in by_set["left_out"]) == [3, 4]
    for _, i, j in pairs:
        assert i != j and responses[i][1] == responses[j][1]  # two responses to one prompt
    _, without = build_pairs(3, 0, has_policy=False)
    assert {name for name, _, _ in without} == {"same"}


def test_set_statistics_hand_values():
    utility = np.array([1, 0, 0, 1, 1, 0, 0.5, 0.5])
    # two members' normalised rewards of the 8 responses
    members = torch.tensor(
        [
            [1.0, 0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0],
        ]
    )
    pairs = [("same", 0, 1), ("same", 2, 3), ("same", 4, 5), ("same", 6, 7)]
    table, per_pair = set_statistics(utility, members, pairs, "mean", 1.0, 200, 0)
    same = table["same"]
    # pair (6, 7) has equal utility: left out. (0,1) right, (2,3) wrong (mean reward 1 > 0 but u 0 < 1), (4,5) right
    assert (same["pairs"], same["counted"], same["equal_utility"]) == (4, 3, 1)
    assert same["accuracy"]["mean"] == pytest.approx(2 / 3)
    # response std: [0, 0, 1, 0, 1, 0, 0, 0]; pair means 0 (right), 0.5 (wrong), 0.5 (right): (1 + 0.5) / 2
    assert same["mean_disagreement"] == pytest.approx(0.25)
    assert same["auroc"]["mean"] == pytest.approx(0.75)
    # margin std: (1 - 0, 1 - 0) -> 0 (right); (2, 0) -> 1 (wrong); (1, 3) -> 1 (right): (1 + 0.5) / 2
    assert same["auroc_margin"]["mean"] == pytest.approx(0.75)
    assert [p["correct"] for p in per_pair] == [True, False, True, False]
    assert [p["counted"] for p in per_pair] == [True, True, True, False]
    # one member: no alarm, and the accuracy is that member's own
    single, _ = set_statistics(utility, members[:1], pairs, "mean", 1.0, 200, 0)
    assert single["same"]["auroc"] is None and single["same"]["mean_disagreement"] is None
    assert single["same"]["accuracy"]["mean"] == pytest.approx(2 / 3)


def test_config_quotes_the_bad_value():
    with pytest.raises(ConfigError, match="'unanswerable'"):
        ShiftConfig(reward="r", reference="s", left_out="unanswerable")
    with pytest.raises(ConfigError, match="-1"):
        ShiftConfig(reward="r", reference="s", n_prompts=-1)


def test_cli_writes_three_sets_from_the_right_prompts_and_sources(model_dir, ensemble_dir, tmp_path):
    from preflab.cli import main

    out = tmp_path / "shift"
    args = ["eval", "shift", "--reward", str(ensemble_dir), "--reference", str(model_dir), "--policy", str(model_dir)]
    args += ["--left-out", "unknown", "--n-prompts", "5", "--n-left-out", "3", "--max-new-tokens", "4"]
    assert main(args + ["--n-boot", "20", "--out", str(out)]) == 0
    report = json.loads((out / "shift.json").read_text())
    assert report["members"] == 2 and report["left_out"] == "unknown"
    assert {k: v["pairs"] for k, v in report["sets"].items()} == {"same": 5, "policy": 10, "left_out": 3}
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["kind"] == kind_of(row["prompt"])
        if row["set"] == "left_out":
            assert row["kind"] == "unknown" and (row["source_a"], row["source_b"]) == ("sft", "sft")
        else:
            assert row["kind"] in ("capital", "add")
        if row["set"] == "same":
            assert (row["source_a"], row["source_b"]) == ("sft", "sft")
        if row["set"] == "policy":
            assert row["source_a"] == "policy" and row["source_b"] in ("policy", "sft")
        assert row["disagreement_a"] > 0  # two random members never agree exactly
    assert "left-out kind" in (out / "shift.md").read_text()


# ---- preflab reward --exclude-kind ----------------------------------------------------------------------------


def world_prefs(path):
    """One comparison per held-out-split question of every kind (12 unknown, the rest capital / add)."""
    from preflab.world.tutor import split_tasks

    _, held = split_tasks()
    rows = [{"prompt": [{"role": "user", "content": t.question}], "chosen": "Sure!", "rejected": "No."} for t in held]
    write_jsonl(path, rows)
    return rows


def test_exclude_kind_drops_exactly_the_rows_of_that_kind(tokenizer, tmp_path):
    from preflab.reward.train import RewardConfig, drop_kind, load_pairs

    world_prefs(tmp_path / "p.jsonl")
    rows = load_preferences(tmp_path / "p.jsonl").rows
    kinds = [kind_of(r.prompt) for r in rows]
    assert kinds.count("unknown") > 0
    kept, dropped = drop_kind(rows, "unknown", "p.jsonl")
    assert dropped == kinds.count("unknown")
    assert kept == [r for r, k in zip(rows, kinds) if k != "unknown"]  # the others, in order
    assert drop_kind(rows, "", "p.jsonl") == (rows, 0)
    # through the stage's loader: the same split as without the option, minus those rows on both sides
    config = RewardConfig(model="m", data=str(tmp_path / "p.jsonl"), held_out=0.25)
    train, held, *_ = load_pairs(config, tokenizer)
    config.exclude_kind = "unknown"
    train_x, held_x, held_rows, *_ = load_pairs(config, tokenizer)
    assert len(train_x) + len(held_x) == len(train) + len(held) - kinds.count("unknown")
    assert all(kind_of(r.prompt) != "unknown" for r in held_rows)


def test_exclude_kind_refuses_a_file_without_world_questions_and_a_bad_kind(tmp_path):
    from preflab.reward.train import RewardConfig, drop_kind

    write_jsonl(tmp_path / "o.jsonl", [{"prompt": "Hello there", "chosen": "Hi.", "rejected": "No."}])
    with pytest.raises(DataError, match="no row's prompt is a tutoring-world question"):
        drop_kind(load_preferences(tmp_path / "o.jsonl").rows, "add", "o.jsonl")
    with pytest.raises(ConfigError, match="'unanswerable'"):
        RewardConfig(model="m", data="d", exclude_kind="unanswerable")
