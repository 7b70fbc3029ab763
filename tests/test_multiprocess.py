"""Two processes (torchrun, gloo on CPU) give the same losses and parameters as one process with the same global
batch: each takes every second item of a step, and the loss is scaled so DDP's averaging sums the shares. For the
online stages (ppo, grpo, rloo) each process also samples every second rollout row, with the random numbers one
process would draw, so the rollouts, and with them every logged metric, are the one-process ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import demos_file, prefs_file
from safetensors.torch import load_file

TOLERANCE = 1e-5  # float sums in another order (per-process partial sums, then the all-reduce)


ONLINE = [  # shares of a minibatch and of the eval prompts that split unevenly (3 + 2), micro-batches of 1
    "--reward",
    "preflab.world.rewards:length_closeness",
    "--n-prompts",
    "40",
    "--eval-prompts",
    "5",
    "--max-new-tokens",
    "8",
    "--micro-batch-size",
    "1",
    "--epochs",
    "2",
]


def argv_for(stage, model_dir, tmp_path):
    common = ["--max-steps", "3", "--seed", "1", "--log-every", "1", "--lr", "0.01"]
    if stage == "ppo":  # adaptive KL, whitened rewards: every step's statistic over the whole batch
        return [
            "ppo",
            "--model",
            str(model_dir),
            *ONLINE,
            "--batch-size",
            "10",
            "--mini-batch-size",
            "5",
            "--target-kl",
            "0.5",
            "--whiten-rewards",
            "true",
            *common,
        ]
    if stage in ("grpo", "rloo"):  # groups of 3 rows, minibatches of 3: groups straddle the two processes
        return [
            stage,
            "--model",
            str(model_dir),
            *ONLINE,
            "--batch-size",
            "3",
            "--k",
            "3",
            "--mini-batch-size",
            "3",
            *common,
        ]
    if stage == "pretrain":
        return [
            "pretrain",
            "--world-docs",
            "200",
            "--vocab-size",
            "300",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--max-seconds",
            "0",
            *common,
        ]
    if stage == "sft":
        return [
            "sft",
            "--model",
            str(model_dir),
            "--data",
            str(demos_file(tmp_path)),
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            "--held-out",
            "0.25",
            *common,
        ]
    if stage == "reward":
        return [
            "reward",
            "--model",
            str(model_dir),
            "--data",
            str(prefs_file(tmp_path)),
            "--batch-size",
            "2",
            "--gradient-accumulation",
            "2",
            "--reference-rows",
            "8",
            *common,
        ]
    return [
        "dpo",
        "--model",
        str(model_dir),
        "--data",
        str(prefs_file(tmp_path)),
        "--batch-size",
        "4",
        "--micro-batch-size",
        "1",
        "--eval-every",
        "1",
        *common,
    ]


def run(argv, out, processes):
    env = {**os.environ, "PREFLAB_QUIET": "1", "OMP_NUM_THREADS": "1"}
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        if processes > 1
        else [sys.executable]
    )
    done = subprocess.run(
        [*launcher, "-m", "preflab.cli", *argv, "--out", str(out), "--threads", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "dpo", "ppo", "grpo", "rloo"])
def test_two_processes_equal_one_with_the_same_global_batch(stage, model_dir, tmp_path):
    argv = argv_for(stage, model_dir, tmp_path)
    run(argv, tmp_path / "one", 1)
    run(argv, tmp_path / "two", 2)
    saved = [*(tmp_path / "one" / "model").glob("*.safetensors"), *(tmp_path / "one").glob("value_model/*.safetensors")]
    assert saved
    for path in sorted(saved):
        a, b = load_file(path), load_file(tmp_path / "two" / path.relative_to(tmp_path / "one"))
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < TOLERANCE, (path.name, worst)
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert len(rows[0]) == len(rows[1])
    for x, y in zip(*rows):
        for key, value in x.items():
            if isinstance(value, float) and "per_second" not in key and "seconds" not in key:
                assert y[key] == pytest.approx(value, abs=TOLERANCE, rel=TOLERANCE / 10), key
    assert not list((tmp_path / "two").glob("rank*"))  # one run folder, written by rank 0 only
