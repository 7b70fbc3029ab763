"""`preflab reward` and `preflab eval reward` through the real entry point, on the micro model."""

import json
import random

import pytest
import torch

from preflab.cli import main
from preflab.data import write_jsonl
from preflab.reward import load_reward
from preflab.runs import read_metrics


def synthetic_prefs(n=40, seed=0):
    """Chosen answers are polite and correct, rejected ones curt: a pattern a micro model can pick up."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append(
            {
                "prompt": f"What is {a} plus {b}?",
                "chosen": f"The answer is {a + b}.",
                "rejected": "No.",
                "subset": "math/add" if i % 2 else "chat/easy",
            }
        )
    return rows


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    write_jsonl(path, synthetic_prefs())
    return path


@pytest.mark.slow
def test_cli_trains_saves_normalises_and_evaluates(model_dir, prefs, tmp_path, capsys):
    out = tmp_path / "rm"
    code = main(
        [
            "reward",
            "--model",
            str(model_dir),
            "--data",
            str(prefs),
            "--out",
            str(out),
            "--held-out",
            "0.25",
            "--batch-size",
            "4",
            "--gradient-accumulation",
            "2",
            "--epochs",
            "3",
            "--lr",
            "3e-3",
            "--log-every",
            "2",
        ]
    )
    assert code == 0
    # artefacts: a Hugging Face directory + head + json, metrics, summary
    for name in ("config.json", "model.safetensors", "tokenizer.json", "reward_head.safetensors", "reward_model.json"):
        assert (out / "model" / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_pairs"] == 30 and summary["eval_pairs"] == 10
    assert summary["steps"] == 3 * 4  # ceil(30 / (4 x 2)) steps per epoch
    metrics = read_metrics(out)
    names = set().union(*metrics)
    for name in (
        "reward/loss",
        "reward/accuracy",
        "reward/margin",
        "reward/chosen",
        "reward/rejected",
        "reward/eval/loss",
        "reward/eval/accuracy",
        "reward/eval/ece",
    ):
        assert name in names, name
    losses = [m["reward/loss"] for m in metrics if "reward/loss" in m]
    assert losses[-1] < losses[0]  # it learns the pattern
    assert summary["eval_accuracy"] == 1.0
    held = json.loads((out / "report.json").read_text())  # the held-out report written by training
    assert held["pairs"] == 10 and held["accuracy"] == 1.0 and held["longer_wins"] == 1.0
    assert summary["eval_ece"] == pytest.approx(held["ece"])
    # normalisation: the training pairs' chosen + rejected responses score mean 0, std 1
    rows = synthetic_prefs()
    from preflab.data import load_preferences, split_rows

    train, _ = split_rows(load_preferences(prefs).rows, 0.25, 0)
    reward = load_reward(str(out))
    scores = reward([r.prompt for r in train] * 2, [r.chosen for r in train] + [r.rejected for r in train])
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    assert len(rows) == 40
    # evaluation on the held-out side of the same split
    capsys.readouterr()
    ev = tmp_path / "ev"
    assert (
        main(
            [
                "eval",
                "reward",
                "--model",
                str(out),
                "--data",
                str(prefs),
                "--split",
                "heldout",
                "--held-out",
                "0.25",
                "--out",
                str(ev),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| longer wins |" in printed and "Calibration" in printed
    report = json.loads((ev / "report.json").read_text())
    assert report["pairs"] == 10 and report["accuracy"] == pytest.approx(summary["eval_accuracy"])
    assert report["longer_wins"] == 1.0 and report["shorter_wins"] == 0.0  # chosen is always longer here
    assert {s["section"] for s in report["sections"]} == {"math", "chat"}
    assert len((ev / "pairs.jsonl").read_text().splitlines()) == 10
    assert (ev / "report.md").read_text().startswith("## Reward model")


@pytest.mark.slow
def test_cli_ensemble_of_two_members(model_dir, prefs, tmp_path):
    out = tmp_path / "ens"
    assert (
        main(
            [
                "reward",
                "--model",
                str(model_dir),
                "--data",
                str(prefs),
                "--out",
                str(out),
                "--ensemble",
                "2",
                "--batch-size",
                "8",
                "--max-steps",
                "2",
                "--reduce",
                "min",
            ]
        )
        == 0
    )
    index = json.loads((out / "model" / "ensemble.json").read_text())
    assert index == {"members": ["member-0", "member-1"], "reduce": "min", "lam": 1.0}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["eval_accuracy_members"]) == 2  # 2 steps per member, one step axis
    assert json.loads((out / "report.json").read_text())["members"] == 2
    from preflab.reward.model import RewardModel

    members = [RewardModel.load(out / "model" / m) for m in index["members"]]
    # different seeds: different heads
    assert not torch.equal(members[0].head.weight, members[1].head.weight)
    prompts, responses = ["What is 1 plus 2?"] * 2, ["The answer is 3.", "No."]
    each = torch.stack([m.reward(prompts, responses) for m in members])
    torch.testing.assert_close(load_reward(str(out))(prompts, responses), each.min(0).values)
    ev = tmp_path / "ev"
    assert (
        main(["eval", "reward", "--model", str(out), "--data", str(prefs), "--out", str(ev), "--reduce", "mean"]) == 0
    )
    report = json.loads((ev / "report.json").read_text())
    assert report["members"] == 2 and "disagreement" in report
    first = json.loads((ev / "pairs.jsonl").read_text().splitlines()[0])
    assert len(first["member_margins"]) == 2 and first["disagreement"] >= 0
    # member 0 is the reward model a one-member run with the same seed trains (the demo uses it as its single RM)
    single = tmp_path / "single"
    argv = ["reward", "--model", str(model_dir), "--data", str(prefs), "--batch-size", "8", "--max-steps", "2"]
    assert main([*argv, "--out", str(single)]) == 0
    alone = RewardModel.load(single)
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), members[0].state_dict().values()))
    assert summary["eval_accuracy_members"][0] == json.loads((single / "summary.json").read_text())["eval_accuracy"]


def test_a_file_with_no_usable_rows_is_a_clear_error(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["reward", "--model", str(model_dir), "--data", str(empty), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no usable rows" in err and "Traceback" not in err


def test_a_model_that_is_not_a_causal_lm_is_a_clear_error(prefs, tmp_path, capsys):
    bad = tmp_path / "encoder"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "distilbert"}))
    assert main(["reward", "--model", str(bad), "--data", str(prefs), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not a causal LM" in err and "Traceback" not in err


def test_bad_options_are_refused_with_the_value(model_dir, prefs, capsys):
    assert main(["reward", "--model", str(model_dir), "--data", str(prefs), "--label-smoothing", "0.7"]) == 2
    assert "0.7" in capsys.readouterr().err


def test_held_out_split_eval_data_and_reference_responses(tokenizer, prefs, tmp_path):
    from preflab.data import encode_completion, encode_prompt, load_preferences, split_rows
    from preflab.reward.train import RewardConfig, load_pairs, reference_ids

    # the held-out split is split_rows(seed): the same seed gives the same held-out prompts
    config = RewardConfig(model="m", data=str(prefs), held_out=0.25, split_seed=3, max_rows=5)
    train, held, held_rows, _, _ = load_pairs(config, tokenizer)
    _, expected = split_rows(load_preferences(prefs).rows, 0.25, 3)
    assert [r.source for r in held_rows] == [r.source for r in expected] and len(held) == 10 and len(train) == 5
    # --eval-data: every row of --data trains
    train, held, _, _, _ = load_pairs(RewardConfig(model="m", data=str(prefs), eval_data=str(prefs)), tokenizer)
    assert len(train) == 40 and len(held) == 40
    # default reference: the training pairs' chosen then rejected responses
    prompts, completions, source = reference_ids(RewardConfig(model="m", data="d", reference_rows=2), tokenizer, train)
    assert prompts == [train[0].prompt_ids, train[1].prompt_ids] * 2
    assert completions == [train[0].chosen_ids, train[1].chosen_ids, train[0].rejected_ids, train[1].rejected_ids]
    # --reference: a demonstration file's prompt + completion, truncated like training
    ref = tmp_path / "ref.jsonl"
    write_jsonl(ref, [{"prompt": "What is 4 plus 4?", "completion": "The answer is 8, as four and four make eight."}])
    config = RewardConfig(model="m", data="d", reference=str(ref), max_completion_length=4)
    prompts, completions, source = reference_ids(config, tokenizer, train)
    assert prompts == [encode_prompt(tokenizer, "What is 4 plus 4?")] and source == str(ref)
    assert completions == [encode_completion(tokenizer, "The answer is 8, as four and four make eight.")[:4]]


def test_group_by_length_batches_like_lengths_and_keeps_every_pair_once_an_epoch():
    from preflab.data.tokenize import TokenizedPair, pair_length
    from preflab.reward.train import step_batches

    rng = random.Random(1)
    pairs = [
        TokenizedPair([1] * rng.randint(3, 8), [2] * rng.randint(1, 40), [3] * rng.randint(1, 40), source=str(i))
        for i in range(1000)
    ]

    def epoch(group: bool) -> list[list]:
        gen = step_batches(pairs, 8, random.Random(0), group)
        return [next(gen) for _ in range(125)]  # 1000 pairs / 8: one epoch

    def padded(batches) -> int:  # chosen and rejected rows padded to the batch's longest sequence
        return sum(2 * len(b) * max(map(pair_length, b)) for b in batches)

    plain, grouped = epoch(False), epoch(True)
    assert sorted(p.source for b in grouped for p in b) == sorted(p.source for p in pairs)
    assert all(len(b) == 8 for b in grouped)  # 1000 = 125 x 8: no incomplete batch
    # the default is the plain shuffled order, unchanged
    order = pairs[:]
    random.Random(0).shuffle(order)
    assert [p.source for b in plain for p in b] == [p.source for p in order]
    # batches of like lengths: a fifth less padded compute here (uniform lengths; 35% less on the demo's votes)
    assert padded(grouped) < 0.8 * padded(plain)
    lengths = [max(map(pair_length, b)) for b in grouped]
    assert lengths != sorted(lengths)  # the batches themselves are shuffled


def test_length_grouped_keeps_an_incomplete_batch_last():
    """DPO drops an epoch's incomplete tail, so the grouped order must keep it at the end, whole batches before."""
    from preflab.training import length_grouped

    items = list(range(103))
    random.Random(0).shuffle(items)
    grouped = length_grouped(items, 10, random.Random(1), length=lambda i: i % 37)
    assert sorted(grouped) == list(range(103))
    batches = [grouped[i : i + 10] for i in range(0, 103, 10)]
    assert len(batches[-1]) == 3
    # within the first run of 50 batches (all of them here) each batch is a slice of the length-sorted order
    ranks = {item: r for r, item in enumerate(sorted(items, key=lambda i: i % 37))}
    for batch in batches:
        spots = sorted(ranks[i] for i in batch)
        assert spots[-1] - spots[0] == len(batch) - 1
