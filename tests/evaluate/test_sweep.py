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


def _sweep_argv(model_dir, out, *extra):
    return [
        "eval",
        "sweep",
        "--model",
        str(model_dir),
        "--reward",
        "preflab.world.rewards:length_closeness",
        "--algorithm",
        "ppo",
        "--betas",
        "0.1",
        "--steps",
        "1,2",
        "--n-prompts",
        "6",
        "--max-new-tokens",
        "5",
        "--out",
        str(out),
        *extra,
    ]


def test_an_arm_trained_already_is_measured_as_if_the_sweep_trained_it(model_dir, tmp_path, capsys):
    """The demo's PPO run doubles as the sweep's arm at its beta (`--trained LABEL=RUN`): same points, no training."""
    import json

    options = ["--config", str(tmp_path / "rl.yaml")]
    (tmp_path / "rl.yaml").write_text("rl_options: {batch_size: 4, mini_batch_size: 2, micro_batch_size: 2}\n")
    assert main(_sweep_argv(model_dir, tmp_path / "own", *options)) == 0
    arm_run = tmp_path / "own" / "runs" / "beta=0.1"
    assert main(_sweep_argv(model_dir, tmp_path / "reused", *options, "--trained", f"beta=0.1={arm_run}")) == 0
    assert "trained already" in capsys.readouterr().out
    assert not (tmp_path / "reused" / "runs").exists()
    own, reused = (json.loads((tmp_path / d / "sweep.json").read_text())["points"] for d in ("own", "reused"))
    assert [{k: v for k, v in p.items() if k != "run"} for p in own] == [
        {k: v for k, v in p.items() if k != "run"} for p in reused
    ]


def test_a_trained_arm_without_its_checkpoints_is_refused(model_dir, tmp_path, capsys):
    argv = _sweep_argv(model_dir, tmp_path / "s", "--trained", f"beta=0.1={tmp_path / 'nowhere'}")
    assert main(argv) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(_sweep_argv(model_dir, tmp_path / "s", "--trained", "beta=0.5=x")) == 2
