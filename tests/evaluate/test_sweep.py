"""The sweep's premise: the checkpoint at step N of a long online run is the policy an N-step run ends with."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from preflab.cli import main


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_checkpoint_at_step_n_equals_a_run_of_n_steps(stage, model_dir, tmp_path):
    argv = [
        stage,
        "--model",
        str(model_dir),
        "--reward",
        "preflab.world.rewards:length_closeness",
        "--max-new-tokens",
        "5",
        "--eval-prompts",
        "0",
        "--n-prompts",
        "8",
        "--batch-size",
        "4",
        "--mini-batch-size",
        "2",
        "--micro-batch-size",
        "2",
        "--beta",
        "0.1",
    ]
    if stage == "grpo":
        argv += ["--k", "2"]
    assert (
        main(
            [
                *argv,
                "--max-steps",
                "4",
                "--checkpoint-every",
                "2",
                "--keep-checkpoints",
                "2",
                "--out",
                str(tmp_path / "long"),
            ]
        )
        == 0
    )
    assert main([*argv, "--max-steps", "2", "--out", str(tmp_path / "short")]) == 0
    mid = load_file(tmp_path / "long" / "checkpoints" / "step-00000002" / "model.safetensors")
    short = load_file(tmp_path / "short" / "model" / "model.safetensors")
    assert mid.keys() == short.keys() and all(torch.equal(mid[k], short[k]) for k in mid)
    end = load_file(tmp_path / "long" / "model" / "model.safetensors")
    assert any(not torch.equal(mid[k], end[k]) for k in mid)  # and it kept training
