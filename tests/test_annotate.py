"""`preflab annotate` (AI feedback): judges' votes as comparison JSONL, on hand-made pairs and the micro model."""

import json
import re
from types import SimpleNamespace

import pytest
import torch

from preflab.annotate import AnnotateConfig, LMJudge, answer_token_ids
from preflab.cli import main
from preflab.config import ConfigError
from preflab.data import load_preferences, write_jsonl
from preflab.world import true_utility
from preflab.world.annotators import world_pairs


def shorter(prompt, response: str) -> float:
    """A judge for the tests: the shorter response (in characters) wins."""
    return -float(len(response))


def pairs_file(path, pairs):
    return write_jsonl(path, [{"prompt": p, "response_a": a, "response_b": b} for p, a, b in pairs])


def annotate(tmp_path, *args, name="run"):
    """Run `preflab annotate` through the real entry point; (rows written, summary)."""
    out, run = tmp_path / f"{name}.jsonl", tmp_path / name
    assert main(["annotate", *args, "--out", str(out), "--out-dir", str(run)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return rows, json.loads((run / "summary.json").read_text())


def signed_margin(row, a: str) -> float:
    """The judge's margin for response a over the other one, read back from a vote row."""
    return row["judge_margin"] if row["chosen"] == a else -row["judge_margin"]


def test_world_judge_agrees_with_the_truth_on_every_pair(tmp_path):
    pairs = world_pairs(60, seed=3)
    rows, summary = annotate(
        tmp_path, "--judge", "world", "--pairs", str(pairs_file(tmp_path / "p.jsonl", pairs)), "--truth", "world"
    )
    assert summary["agreement"] == 1.0 and summary["agreement_low"] == 1.0
    assert summary["pairs"] == len(rows) == len(pairs)
    for row, (prompt, a, b) in zip(rows, pairs):
        u_c, u_r = true_utility(prompt, row["chosen"]).total, true_utility(prompt, row["rejected"]).total
        assert row["tie"] == (u_c == u_r) and u_c >= u_r
        assert row["judge_margin"] == pytest.approx(u_c - u_r)
        assert {row["chosen"], row["rejected"]} == {a, b}
        assert row["chosen_position"] == ("A" if row["chosen"] == a else "B")
    assert summary["ties"] == summary["truth_ties"] > 0  # the oracle ties exactly where the truth does


def test_a_function_judge_gives_the_expected_votes(tmp_path):
    pairs = [
        ("Say hi.", "Hello there, friend.", "Hi."),  # B shorter
        ("Say hi.", "Yo.", "Good day to you."),  # A shorter
        ("Count.", "one", "two"),  # equal length: a tie, shown order kept
    ]
    path = pairs_file(tmp_path / "p.jsonl", pairs)
    rows, summary = annotate(tmp_path, "--judge", f"{__name__}:shorter", "--pairs", str(path))
    assert [(r["chosen"], r["rejected"], r["tie"], r["chosen_position"]) for r in rows] == [
        ("Hi.", "Hello there, friend.", False, "B"),
        ("Yo.", "Good day to you.", False, "A"),
        ("one", "two", True, "A"),
    ]
    assert [r["judge_margin"] for r in rows] == [17.0, 13.0, 0.0]
    assert all(r["annotator"] == f"judge:{__name__}:shorter" and "margin" not in r for r in rows)
    assert summary["ties"] == 1 and summary["judge_kind"] == "function"
    assert [r.source for r in load_preferences(tmp_path / "run.jsonl")] == [
        f"{tmp_path / 'run.jsonl'}:{i}" for i in (1, 2, 3)
    ]
    # --tie-margin: a 13-character gap is now a tie (kept in the shown order); --write-margin adds `margin`
    rows, _ = annotate(
        tmp_path,
        "--judge",
        f"{__name__}:shorter",
        "--pairs",
        str(path),
        "--tie-margin",
        "15",
        "--write-margin",
        "true",
        name="wide",
    )
    assert [r["tie"] for r in rows] == [False, True, True]
    assert [r["margin"] for r in rows] == [17.0, 13.0, 0.0]


def test_prompt_chosen_rejected_rows_are_pairs_too(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Q?", "chosen": "A long answer.", "rejected": "No."}])
    rows, _ = annotate(tmp_path, "--judge", f"{__name__}:shorter", "--pairs", str(path))
    assert (rows[0]["chosen"], rows[0]["chosen_position"]) == ("No.", "B")  # chosen was shown as A


def test_votes_train_a_reward_model_which_then_judges(tmp_path, model_dir):
    pairs = world_pairs(24, seed=1)
    votes, _ = annotate(tmp_path, "--judge", "world", "--pairs", str(pairs_file(tmp_path / "p.jsonl", pairs)))
    assert len(load_preferences(tmp_path / "run.jsonl")) == len(votes)
    rm = tmp_path / "rm"
    assert (
        main(
            [
                "reward",
                "--model",
                str(model_dir),
                "--data",
                str(tmp_path / "run.jsonl"),
                "--out",
                str(rm),
                "--max-steps",
                "3",
                "--batch-size",
                "4",
                "--held-out",
                "0.25",
            ]
        )
        == 0
    )
    summary = json.loads((rm / "summary.json").read_text())
    assert summary["steps"] == 3
    # the trained reward model as a judge: its margins are r(A) - r(B) under the reward interface
    rows, summary = annotate(tmp_path, "--judge", str(rm), "--pairs", str(tmp_path / "p.jsonl"), name="rm-votes")
    from preflab.reward import load_reward

    reward = load_reward(str(rm))
    prompts, a, b = zip(*pairs)
    expected = reward(list(prompts), list(a)) - reward(list(prompts), list(b))
    got = torch.tensor([signed_margin(r, x) for r, x in zip(rows, a)])
    assert summary["judge_kind"] == "reward_model"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


class LetterModel(torch.nn.Module):
    """A judge LM with hand-set next-token logits: log p(A) - log p(B) = 2 (it likes the letter A) + 0.1 x
    (words of Response A - words of Response B) (it likes long answers). Everything else gets -inf."""

    def __init__(self, tokenizer, id_a: int, id_b: int):
        super().__init__()
        self.tokenizer, self.id_a, self.id_b = tokenizer, id_a, id_b
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, **kwargs):
        logits = torch.full((len(input_ids), 1, len(self.tokenizer)), -torch.inf)
        for i, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            text = self.tokenizer.decode(ids[mask.bool()])
            first, second = re.search(r"Response A:\n(.*)\n\nResponse B:\n(.*)\n\nWhich", text, re.S).groups()
            logits[i, 0, self.id_a] = 2.0 + 0.1 * (len(first.split()) - len(second.split()))
            logits[i, 0, self.id_b] = 0.0
        return SimpleNamespace(logits=logits)


def test_lm_judge_asks_both_orders_and_cancels_its_position_bias(tokenizer):
    id_a, id_b = answer_token_ids(tokenizer, leading_space=False)
    judge = LMJudge(LetterModel(tokenizer, id_a, id_b), tokenizer, "Be brief.", batch_size=3)
    prompts = ["What is 2 + 3?"] * 2
    short, long = "5.", "The answer is 5."
    margins = judge(prompts, [short, long], [long, short])
    # one order alone would say A both times (2 +- 0.3 > 0); both orders: margin = 0.1 x (words x - words y)
    torch.testing.assert_close(margins, torch.tensor([-0.3, 0.3]), atol=1e-6, rtol=0)
    torch.testing.assert_close(judge.position_bias, torch.tensor([2.0, 2.0]), atol=1e-6, rtol=0)
    assert judge.chat  # the micro tokenizer has a chat template: the answer is "A" / "B" with no space


def test_lm_judge_margin_is_antisymmetric_on_the_micro_model(tmp_path, model_dir):
    """Each pair followed by its swap: annotate(pair) == -annotate(swapped pair) within 1e-6, in one run."""
    pairs = [x for p, a, b in world_pairs(4, seed=2) for x in ((p, a, b), (p, b, a))]
    constitution = tmp_path / "principles.txt"
    constitution.write_text("Prefer the right answer.\n")
    rows, summary = annotate(
        tmp_path,
        "--judge",
        str(model_dir),
        "--pairs",
        str(pairs_file(tmp_path / "p.jsonl", pairs)),
        "--constitution",
        str(constitution),
        "--batch-size",
        "3",
        "--truth",
        "world",
    )
    margins = [signed_margin(r, a) for r, (_, a, _) in zip(rows, pairs)]
    assert any(abs(m) > 1e-4 for m in margins)  # the random micro model does prefer something
    for i in range(0, len(rows), 2):
        assert margins[i] == pytest.approx(-margins[i + 1], abs=1e-6)
        assert rows[i]["judge_position_bias"] == pytest.approx(rows[i + 1]["judge_position_bias"], abs=1e-6)
    assert summary["judge_kind"] == "lm" and "position_bias" in summary and 0 <= summary["agreement"] <= 1
    assert 0 <= summary["agreement_one_order"] <= 1


def test_a_bad_row_names_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "Q?", "response_a": "yes", "response_b": "no"}\n\n{"prompt": "Q?", "response_a": "yes"}\n'
    )
    assert main(["annotate", "--judge", "world", "--pairs", str(path), "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3" in err and "response_b" in err
    assert not (tmp_path / "r").exists()  # stopped before any run folder was written


def test_truth_world_on_pairs_from_elsewhere_is_an_error(tmp_path, capsys):
    path = pairs_file(tmp_path / "p.jsonl", [("Write a poem.", "Roses.", "Violets are blue.")])
    argv = ["annotate", "--judge", f"{__name__}:shorter", "--pairs", str(path), "--truth", "world"]
    assert main([*argv, "--out-dir", str(tmp_path / "r")]) == 2
    assert f"{path}:1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value, quoted",
    [("tie_margin", -1.0, "-1.0"), ("truth", "people", "'people'"), ("max_pairs", -2, "-2"), ("batch_size", 0, "0")],
)
def test_config_rejects_bad_values_quoting_them(field, value, quoted):
    with pytest.raises(ConfigError, match=re.escape(quoted)):
        AnnotateConfig(judge="world", pairs="p.jsonl", **{field: value})


def test_constitution_is_refused_for_a_reward_judge(tmp_path, capsys):
    path = pairs_file(tmp_path / "p.jsonl", [("Q?", "a", "bb")])
    argv = ["annotate", "--judge", "world", "--pairs", str(path), "--constitution", str(path)]
    assert main([*argv, "--out-dir", str(tmp_path / "r")]) == 2
    assert "LM judge" in capsys.readouterr().err


def test_people_agreement_on_hand_made_votes(tmp_path, capsys):
    """--people: per person's vote on a judged pair (matched by prompt and responses, either order), 1 when the
    judge chose as the person did, 0.5 for a judge's tie, 0 otherwise; people's ties and unvoted pairs left out."""
    pairs = [
        ("Say hi.", "Hello there, friend.", "Hi."),  # the judge (shorter wins) picks "Hi."
        ("Say hi.", "Yo.", "Good day to you."),  # the judge picks "Yo."
        ("Count.", "one", "two"),  # the judge ties
        ("Q?", "x", "yy"),  # nobody voted on it
    ]
    people = [
        {"prompt": "Say hi.", "chosen": "Hi.", "rejected": "Hello there, friend."},  # agrees (shown the other way)
        {"prompt": "Say hi.", "chosen": "Good day to you.", "rejected": "Yo."},  # disagrees
        {"prompt": "Say hi.", "chosen": "Yo.", "rejected": "Good day to you.", "tie": True},  # a tie: left out
        {"prompt": "Count.", "chosen": "two", "rejected": "one"},  # the judge's tie: 0.5
        {"prompt": "Other?", "chosen": "x", "rejected": "yy"},  # not a judged pair (another prompt)
    ]
    path, votes = pairs_file(tmp_path / "p.jsonl", pairs), write_jsonl(tmp_path / "people.jsonl", people)
    _, summary = annotate(tmp_path, "--judge", f"{__name__}:shorter", "--pairs", str(path), "--people", str(votes))
    assert summary["people_agreement"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert summary["people_agreement_low"] <= summary["people_agreement"] <= summary["people_agreement_high"]
    assert 0 <= summary["people_agreement_low"] and summary["people_agreement_high"] <= 1
    assert (summary["people_votes"], summary["people_ties"], summary["pairs_without_people"]) == (3, 1, 1)
    # no vote matches a judged pair: an error, not an agreement of nan
    write_jsonl(votes, people[-1:])
    argv = ["annotate", "--judge", f"{__name__}:shorter", "--pairs", str(path), "--people", str(votes)]
    assert main([*argv, "--out-dir", str(tmp_path / "none")]) == 2
    assert "no non-tie vote matches" in capsys.readouterr().err
