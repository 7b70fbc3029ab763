"""Generate: n responses per prompt through the rollout engine, and every distinct pair as comparison candidates."""

from __future__ import annotations

import json
import random

import pytest

from preflab.cli import main
from preflab.config import ConfigError
from preflab.generate import GenerateConfig, candidate_pairs


def test_candidate_pairs_are_every_distinct_pair():
    pairs = candidate_pairs("p", ["a", "b", "a", "c", " "], random.Random(0))
    assert len(pairs) == 3  # {a, b, c}: identical and blank responses carry no comparison
    assert {frozenset((p["response_a"], p["response_b"])) for p in pairs} == {
        frozenset("ab"),
        frozenset("ac"),
        frozenset("bc"),
    }
    assert all(p["prompt"] == "p" for p in pairs)
    orders = [candidate_pairs("p", ["a", "b"], random.Random(s))[0]["response_a"] for s in range(20)]
    assert set(orders) == {"a", "b"}  # A/B order is shuffled, so position carries no signal


def test_config_validation():
    with pytest.raises(ConfigError, match="0"):
        GenerateConfig(model="m", n=0)
    with pytest.raises(ConfigError, match="'test'"):
        GenerateConfig(model="m", split="test")


def test_k_is_an_alias_of_n():
    import argparse

    from preflab.config import add_config_arguments

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, GenerateConfig)
    assert (
        parser.parse_args(["-k", "3"]).n == parser.parse_args(["-n", "3"]).n == parser.parse_args(["--n", "3"]).n == 3
    )


@pytest.mark.slow
def test_cli_writes_responses_and_pairs(model_dir, tmp_path):
    out = tmp_path / "gen"
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--n-prompts",
                "3",
                "--n",
                "3",
                "--max-new-tokens",
                "5",
                "--pairs",
                "true",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["responses"]) == 3 for r in rows)
    assert all(isinstance(r["prompt"], list) and r["prompt"][-1]["role"] == "user" for r in rows)
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    expected = sum(
        len(set(t for t in r["responses"] if t.strip())) * (len(set(t for t in r["responses"] if t.strip())) - 1) // 2
        for r in rows
    )
    assert len(pairs) == expected and all(p["response_a"] != p["response_b"] for p in pairs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == 3 and summary["responses"] == 9 and "true_utility" in summary


def test_cli_prompts_file_and_bad_row(model_dir, tmp_path, capsys):
    good = tmp_path / "prompts.jsonl"
    good.write_text(
        json.dumps({"prompt": "What is 2 + 3?"})
        + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "Hi"}]})
        + "\n"
    )
    out = tmp_path / "gen"
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--prompts",
                str(good),
                "--n",
                "2",
                "--max-new-tokens",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert len((out / "responses.jsonl").read_text().splitlines()) == 2 and not (out / "pairs.jsonl").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    assert main(["generate", "--model", str(model_dir), "--prompts", str(bad), "--out", str(tmp_path / "g2")]) == 2
    assert "bad.jsonl:2: missing field 'prompt'" in capsys.readouterr().err
