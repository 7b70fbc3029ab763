"""The bias audit finds planted biases, finds none where none were planted, and computes agreement by hand."""

from __future__ import annotations

import json

import pytest

from preflab.data import DataError
from preflab.evaluate.bias import BiasConfig, agreement, audit_votes, krippendorff_alpha, read_votes
from preflab.world.annotators import annotator_pool, simulate_votes, world_pairs, write_votes


def audit_pool(tmp_path, seed=0, **biases):
    pool = annotator_pool(8, seed=seed, **biases)
    path = write_votes(
        tmp_path / "votes.jsonl", simulate_votes(world_pairs(400, seed=seed), pool, seed=seed, votes_per_pair=3)
    )
    votes, positioned = read_votes(str(path))
    return audit_votes(votes, positioned, BiasConfig(file=str(path)))


def test_finds_a_planted_length_bias(tmp_path):
    r = audit_pool(tmp_path, length_bias=0.08)
    lb = r["length_bias"]
    assert lb["excludes_zero"] and lb["low"] > 0
    assert lb["low"] < 0.08 < lb["high"]  # and recovers its size
    assert not r["position_bias"]["excludes_zero"]
    assert r["covariate"].startswith("true utility") and r["ci"] == "wald"


def test_finds_no_bias_in_unbiased_annotators(tmp_path):
    r = audit_pool(tmp_path, seed=1)
    assert not r["length_bias"]["excludes_zero"] and not r["position_bias"]["excludes_zero"]
    # the raw preference for longer responses is far from 0.5 (padding costs utility): the covariate explains it
    longer = r["p_prefer_longer"]
    assert longer["high"] < 0.5 and abs(longer["rate"] - longer["predicted_by_utility"]) < 0.05


def test_finds_a_planted_position_bias_with_the_cluster_bootstrap(tmp_path):
    pool = annotator_pool(8, seed=2, position_bias=0.4)
    path = write_votes(tmp_path / "v.jsonl", simulate_votes(world_pairs(400, seed=2), pool, seed=2, votes_per_pair=3))
    votes, positioned = read_votes(str(path))
    r = audit_votes(votes, positioned, BiasConfig(file=str(path), bootstrap=100))
    assert r["ci"] == "cluster bootstrap"
    assert r["position_bias"]["low"] > 0 and r["p_prefer_first"]["low"] > 0.5
    assert not r["length_bias"]["excludes_zero"]


def test_krippendorff_alpha_by_hand():
    # coincidences o00 = 2, o11 = 2, o01 = o10 = 1; n = 6; D_o = 2/6; D_e = 2*3*3/(6*5) = 0.6; alpha = 1 - (1/3)/0.6
    assert krippendorff_alpha([[0, 0], [1, 1], [0, 1]]) == pytest.approx(4 / 9)
    assert krippendorff_alpha([[0, 0], [1, 1]]) == pytest.approx(1.0)
    assert krippendorff_alpha([[0], [1]]) is None


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_kappa_and_leave_one_out_majority_by_hand(tmp_path):
    q = [{"role": "user", "content": f"What is {i} + 1?"} for i in range(4)]
    good = [f"{i} + 1 = {i + 1}." for i in range(4)]
    bad = [f"{i} + 1 = {i + 3}." for i in range(4)]
    rows = []
    # annotator x prefers good on items 0, 1 and bad on 2, 3; y prefers good on 0 only; z prefers bad on item 0
    for who, picks_good in (("x", [1, 1, 0, 0]), ("y", [1, 0, 0, 0])):
        for i in range(4):
            c, r = (good[i], bad[i]) if picks_good[i] else (bad[i], good[i])
            rows.append({"prompt": [q[i]], "chosen": c, "rejected": r, "annotator": who, "chosen_position": "A"})
    rows.append({"prompt": [q[0]], "chosen": bad[0], "rejected": good[0], "annotator": "z", "chosen_position": "B"})
    votes, positioned = read_votes(write_rows(tmp_path / "k.jsonl", rows))
    result = agreement(votes, min_shared=4)
    # labels by sorted text: x = [g, g, b, b], y = [g, b, b, b]: p_o = 3/4, p_e = 0.5*0.25 + 0.5*0.75 = 0.5, kappa 0.5
    assert result["cohen_kappa"]["x|y"]["kappa"] == pytest.approx(0.5)
    assert "x|z" not in result["cohen_kappa"]  # one shared item < min_shared
    # item 0 has three votes g, g, b: z is outvoted by x and y; x and y each face a 1-1 split (no majority: skipped)
    assert result["loo_majority"] == {"z": {"agreement": 0.0, "n": 1}}


def test_unknown_utility_and_bad_rows(tmp_path):
    rows = [
        {
            "prompt": f"tell me about item {i}",
            "chosen": "short",
            "rejected": "a much longer answer " * (i % 3 + 1),
            "chosen_position": "AB"[i % 2],
        }
        for i in range(30)
    ]
    path = write_rows(tmp_path / "h.jsonl", rows)
    votes, positioned = read_votes(path)
    r = audit_votes(votes, positioned, BiasConfig(file=path))
    assert r["covariate"].startswith("none") and r["length_bias"]["coef"] < 0
    rows[3]["chosen_position"] = "left"
    with pytest.raises(DataError, match=r"h.jsonl:4: field 'chosen_position'"):
        read_votes(write_rows(tmp_path / "h.jsonl", rows))


def test_cli(tmp_path, capsys):
    from preflab.cli import main

    pool = annotator_pool(4, seed=0, length_bias=0.1)
    path = write_votes(tmp_path / "votes.jsonl", simulate_votes(world_pairs(200), pool, seed=0, votes_per_pair=2))
    assert main(["eval", "bias", str(path), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "length bias" in out and "Krippendorff" in out
    saved = json.loads((tmp_path / "run" / "bias.json").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["length_bias"]["excludes_zero"] and summary["length_bias_low"] > 0
    assert main(["eval", "bias", str(tmp_path / "missing.jsonl")]) == 2
