"""Best-of-n: the analytic bounds, and the CLI picks the argmax of n and writes it."""

import json
import math

import pytest

from preflab.policy.bon import kl_bound, win_rate_bound
from preflab.world.rewards import length_closeness


def test_bounds_formula():
    assert kl_bound(1) == 0.0
    assert kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_bound(16) == pytest.approx(math.log(16) - 15 / 16)
    assert win_rate_bound(1) == 0.5 and win_rate_bound(4) == pytest.approx(0.8)


@pytest.mark.slow
def test_bon_cli_keeps_the_best_of_n(model_dir, tmp_path):
    from preflab.cli import main
    from preflab.runs import read_metrics

    out = tmp_path / "bon"
    rc = main(
        [
            "bon",
            "--model",
            str(model_dir),
            "--reward",
            "preflab.world.rewards:length_closeness",
            "--n",
            "4",
            "--n-prompts",
            "5",
            "--max-new-tokens",
            "8",
            "--missing-eos-penalty",
            "0",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    chosen = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(chosen) == 5
    for row in chosen:
        assert row["reward"] == pytest.approx(length_closeness(row["prompt"], row["response"]))
        assert row["reward"] >= row["mean_reward_of_n"] - 1e-6
    metrics = read_metrics(out)[0]
    assert metrics["bon/kl_bound"] == pytest.approx(kl_bound(4))
    assert metrics["bon/reward/best"] == pytest.approx(sum(r["reward"] for r in chosen) / 5, rel=1e-5)
    assert 0.0 <= metrics["bon/win_rate"] <= 1.0
