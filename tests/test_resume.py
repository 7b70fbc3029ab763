"""It survives: a run killed mid-way and resumed ends with the same weights and metrics as an uninterrupted one;
Ctrl-C writes a checkpoint and exits; a corrupt checkpoint falls back to the one before; NaN stops the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import demos_file, prefs_file
from safetensors.torch import load_file

from preflab.cli import main
from preflab.runs import Run, read_metrics

TIMING = ("tokens_per_second", "seconds", "seconds_training")  # wall-clock figures: the only ones allowed to differ


class Crash(BaseException):
    """Stands for SIGKILL: nothing catches it, nothing is cleaned up."""


def stage_argv(stage, model_dir, tmp_path):
    """A few-step run of each training stage on the micro model (checkpoint every 2 steps, 5 steps)."""
    common = ["--checkpoint-every", "2", "--seed", "3"]
    if stage == "sft":
        return [
            "sft",
            "--model",
            str(model_dir),
            "--data",
            str(demos_file(tmp_path)),
            "--max-steps",
            "5",
            "--batch-size",
            "4",
            "--held-out",
            "0.25",
            "--log-every",
            "1",
            *common,
        ]
    if stage == "pretrain":
        return [
            "pretrain",
            "--world-docs",
            "200",
            "--size",
            "tiny",
            "--vocab-size",
            "300",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--max-steps",
            "5",
            "--max-seconds",
            "0",
            "--log-every",
            "1",
            *common,
        ]
    if stage == "reward":
        return [
            "reward",
            "--model",
            str(model_dir),
            "--data",
            str(prefs_file(tmp_path)),
            "--max-steps",
            "3",
            "--ensemble",
            "2",
            "--batch-size",
            "4",
            "--log-every",
            "1",
            "--reference-rows",
            "8",
            *common,
        ]
    if stage == "dpo":
        return [
            "dpo",
            "--model",
            str(model_dir),
            "--data",
            str(prefs_file(tmp_path)),
            "--max-steps",
            "5",
            "--batch-size",
            "4",
            "--micro-batch-size",
            "2",
            "--log-every",
            "1",
            "--eval-every",
            "2",
            *common,
        ]
    if stage in ("ppo", "rloo", "grpo"):
        shape = (
            ["--batch-size", "4", "--mini-batch-size", "2", "--micro-batch-size", "2"]
            if stage == "ppo"
            else ["--batch-size", "2", "--k", "2", "--mini-batch-size", "2", "--micro-batch-size", "2"]
        )
        return [
            stage,
            "--model",
            str(model_dir),
            "--reward",
            "preflab.world.rewards:length_closeness",
            "--max-steps",
            "5",
            "--max-new-tokens",
            "5",
            "--eval-prompts",
            "2",
            "--n-prompts",
            "8",
            "--target-kl",
            "0.5",
            "--horizon",
            "50",
            *shape,
            *common,
        ]
    raise ValueError(stage)


def final_state(out):
    weights = {}
    for path in sorted((out / "model").rglob("*.safetensors")):
        weights.update({f"{path.relative_to(out)}:{k}": v for k, v in load_file(path).items()})
    rows = [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in read_metrics(out)]
    summary = {
        k: v
        for k, v in json.loads((out / "summary.json").read_text()).items()
        if k not in ("seconds", "run_dir") and not k.endswith(TIMING) and k not in ("model", "value_model")
    }
    return weights, rows, summary


def crash_at(monkeypatch, step, exc=Crash, when_key=None):
    """Make `Run.log` interrupt the loop when it logs `step` (after the checkpoint at step - 1 was written)."""
    real = Run.log

    def log(self, s, metrics):
        if s == step and (when_key is None or any(k.endswith(when_key) for k in metrics)):
            if exc is signal.SIGINT:
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise exc("killed")
        return real(self, s, metrics)

    monkeypatch.setattr(Run, "log", log)


def assert_same(a, b):
    wa, ra, sa = a
    wb, rb, sb = b
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name  # bitwise on CPU
    assert ra == rb
    assert sa == sb


STAGES = ["sft", "pretrain", "reward", "dpo", "ppo", "grpo", "rloo"]
CRASH_AT = {"reward": 6}  # the ensemble's second member (member 0: steps 1-3, member 1: steps 4-6)


@pytest.mark.parametrize("stage", STAGES)
def test_killed_then_resumed_equals_uninterrupted(stage, model_dir, tmp_path, monkeypatch):
    argv = stage_argv(stage, model_dir, tmp_path)
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    with monkeypatch.context() as m:
        crash_at(m, CRASH_AT.get(stage, 3))
        with pytest.raises(Crash):
            main([*argv, "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b" / "summary.json").exists()
    newest = sorted((tmp_path / "b" / "checkpoints").iterdir())[-1].name
    assert newest == f"step-{CRASH_AT.get(stage, 3) - 1:08d}"  # resumed from the step before the crash
    assert main([*argv, "--out", str(tmp_path / "b"), "--resume", "true"]) == 0
    assert_same(final_state(tmp_path / "a"), final_state(tmp_path / "b"))


@pytest.mark.parametrize("stage", ["sft", "dpo", "ppo"])
def test_ctrl_c_writes_a_checkpoint_then_resume_finishes_the_same(stage, model_dir, tmp_path, monkeypatch, capsys):
    argv = stage_argv(stage, model_dir, tmp_path)
    argv[argv.index("--checkpoint-every") + 1] = "0"  # only Ctrl-C writes one
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    with monkeypatch.context() as m:
        crash_at(m, 3, exc=signal.SIGINT)
        assert main([*argv, "--out", str(tmp_path / "b")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-00000003"]
    assert main([*argv, "--out", str(tmp_path / "b"), "--resume", "true"]) == 0
    assert_same(final_state(tmp_path / "a"), final_state(tmp_path / "b"))


def test_resume_of_a_finished_run_says_so_and_another_config_is_refused(model_dir, tmp_path, capsys):
    argv = stage_argv("sft", model_dir, tmp_path)
    out = tmp_path / "a"
    assert main([*argv, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*argv, "--out", str(out), "--resume", "true"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert main([*argv, "--out", str(out), "--resume", "true", "--lr", "0.01", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "lr: 0.0003 then, 0.01 now" in err and "batch_size: 4 then, 2 now" in err
    assert main([*argv[:-6], "--resume", "true"]) == 2  # no --out: nothing to resume
    assert "--resume needs --out" in capsys.readouterr().err


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(model_dir, tmp_path, monkeypatch, capsys):
    argv = stage_argv("sft", model_dir, tmp_path)
    out = tmp_path / "b"
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    with monkeypatch.context() as m:
        crash_at(m, 5)
        with pytest.raises(Crash):
            main([*argv, "--out", str(out)])
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-00000002", "step-00000004"]
    weights = ckpts[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated on disk
    (out / "checkpoints" / "step-00000006.tmp").mkdir()  # an interrupted write: never read
    capsys.readouterr()
    assert main([*argv, "--out", str(out), "--resume", "true"]) == 0
    said = capsys.readouterr().out
    assert "step-00000004: model.safetensors does not match its hash" in said and "(step 2)" in said
    assert_same(final_state(tmp_path / "a"), final_state(out))


def test_checkpoints_keep_the_newest_n(model_dir, tmp_path):
    argv = stage_argv("sft", model_dir, tmp_path)
    argv[argv.index("--checkpoint-every") + 1] = "1"
    assert main([*argv, "--out", str(tmp_path / "a"), "--keep-checkpoints", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == [
        "step-00000003",
        "step-00000004",
        "step-00000005",
    ]


def test_a_nan_loss_stops_the_run_naming_step_and_metric(model_dir, tmp_path, monkeypatch, capsys):
    import preflab.sft as sft_module

    argv = stage_argv("sft", model_dir, tmp_path)
    real = sft_module.sft_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss  # the third step's loss

    monkeypatch.setattr(sft_module, "sft_loss", poisoned)
    out = tmp_path / "a"
    assert main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "step 3: sft/loss is not finite" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and "step 3" in summary["reason"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]  # the last good one


@pytest.mark.slow
def test_sigkill_of_a_real_process_then_resume(model_dir, tmp_path):
    """A real `kill -9` of a separate process once its first checkpoint exists, then --resume."""
    argv = stage_argv("sft", model_dir, tmp_path)
    argv[argv.index("--max-steps") + 1] = "40"  # long enough that the kill lands before the end on a fast machine
    argv[argv.index("--checkpoint-every") + 1] = "1"
    env = {**os.environ, "PREFLAB_QUIET": "1"}
    cmd = [sys.executable, "-m", "preflab.cli", *argv]
    assert subprocess.run([*cmd, "--out", str(tmp_path / "a")], env=env, capture_output=True).returncode == 0
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "b")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "b").glob("checkpoints/step-00000002")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "summary.json").exists(), "the run finished before it could be killed"
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path / "b"), "--resume", "true"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert_same(final_state(tmp_path / "a"), final_state(tmp_path / "b"))


@pytest.mark.parametrize(
    "broken, flag, said",
    [
        (float("nan"), [], "step 1: scores is not finite"),
        (1e9, [], "step 1: a score of magnitude 1e+09 is beyond max_abs_score"),
        (None, ["--max-kl", "1e-12", "--kl-estimator", "k3"], "step 2: objective/kl"),
    ],
)
def test_a_broken_reward_or_a_kl_past_max_kl_stops_an_online_run(
    broken, flag, said, model_dir, tmp_path, monkeypatch, capsys
):
    import preflab.world.rewards as rewards

    if broken is not None:
        monkeypatch.setattr(rewards, "length_closeness", lambda prompt, response: broken)
    argv = stage_argv("grpo", model_dir, tmp_path)
    out = tmp_path / "r"
    assert main([*argv, *flag, "--out", str(out)]) == 1
    assert said in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and said in summary["reason"]


def test_first_ctrl_c_asks_to_stop_after_the_step_a_second_stops_at_once(capsys):
    from preflab.training import StopRequest

    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested  # the loop finishes its step, checkpoints, exits
        assert "Ctrl-C again to stop at once" in capsys.readouterr().out
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back
