"""The optimised online paths give the plain paths' losses (within 1e-5) and the same samples.

Single pass (`online.single_pass`: one epoch, one minibatch, one micro-batch per rollout) takes the old log-probs
(and PPO's old values) from the update's own forward instead of recomputing them after sampling; a critic-free run
with beta 0 and nothing reading the KL skips the reference (`online.needs_reference`). Each test runs a stage
twice from the same seed, once with the shortcut and once with it switched off, and compares the logs.
"""

import pytest
import torch

import preflab.policy.ppo as ppo_mod
import preflab.policy.rloo as rloo_mod
from preflab.policy.online import needs_reference, single_pass
from preflab.policy.ppo import PPOConfig, ppo
from preflab.policy.rloo import GRPOConfig, RLOOConfig, grpo, rloo
from preflab.runs import read_metrics

REWARD = "preflab.world.rewards:length_closeness"
LOSSES = {
    "rloo": ("rloo/loss/policy", "rloo/objective/kl", "rloo/objective/entropy", "rloo/val/ratio"),
    "grpo": ("grpo/loss/policy", "grpo/loss/kl", "grpo/objective/entropy", "grpo/val/ratio"),
    "ppo": (
        "ppo/loss/policy",
        "ppo/loss/value",
        "ppo/objective/kl",
        "ppo/objective/rlhf_reward",
        "ppo/objective/entropy",
        "ppo/val/explained_variance",
    ),
}


def run(method, model_dir, out, **kw):
    common = dict(
        model=str(model_dir),
        reward=REWARD,
        max_steps=3,
        epochs=1,
        max_new_tokens=8,
        eval_prompts=0,
        n_prompts=16,
        lr=1e-3,
        seed=3,
        out=str(out),
    )
    common.update(kw)
    if method == "ppo":
        ppo(PPOConfig(batch_size=4, mini_batch_size=4, micro_batch_size=4, **common))
    elif method == "rloo":
        rloo(RLOOConfig(batch_size=2, k=2, mini_batch_size=4, micro_batch_size=4, **common))
    else:
        grpo(GRPOConfig(batch_size=2, k=2, mini_batch_size=4, micro_batch_size=4, **common))
    return read_metrics(out)


def assert_same_run(fast, plain, names):
    assert len(fast) == len(plain) == 3
    for a, b in zip(fast, plain):
        assert a.keys() == b.keys()
        for name in a:
            if name.endswith("/length") or name.endswith("/eos_rate") or name.endswith("/scores"):
                assert a[name] == b[name], name  # the same samples
        for name in names:
            assert a[name] == pytest.approx(b[name], abs=1e-5), name


@pytest.mark.parametrize("method,beta", [("rloo", 0.05), ("grpo", 0.04), ("grpo", 0.0), ("ppo", 0.05)])
def test_single_pass_gives_the_plain_losses(model_dir, tmp_path, monkeypatch, method, beta):
    mod = ppo_mod if method == "ppo" else rloo_mod
    fast = run(method, model_dir, tmp_path / "fast", beta=beta)
    monkeypatch.setattr(mod, "single_pass", lambda config, n, processes=1: False)
    plain = run(method, model_dir, tmp_path / "plain", beta=beta)
    names = [n for n in LOSSES[method] if n in plain[0]]
    assert_same_run(fast, plain, names)
    assert fast[0][f"{method}/policy/first_ratio_dev"] == 0.0  # ratio exactly 1 by construction
    assert plain[0][f"{method}/policy/first_ratio_dev"] < 1e-6


def test_grpo_at_beta_0_skips_the_reference_and_loses_nothing(model_dir, tmp_path, monkeypatch):
    called = []
    real = rloo_mod.rollout_and_score

    def spy(*args, **kw):
        called.append(kw.get("reference", True))
        return real(*args, **kw)

    monkeypatch.setattr(rloo_mod, "rollout_and_score", spy)
    fast = run("grpo", model_dir, tmp_path / "fast", beta=0.0, epochs=2)  # plain update, reference skipped
    assert called == [False] * 3
    monkeypatch.setattr(rloo_mod, "needs_reference", lambda config: True)
    plain = run("grpo", model_dir, tmp_path / "plain", beta=0.0, epochs=2)
    assert called[3:] == [True] * 3
    for a, b in zip(fast, plain):
        assert "grpo/objective/kl" not in a and "grpo/objective/kl" in b  # nothing to log it from
        for name in ("grpo/loss/policy", "grpo/loss/kl", "grpo/objective/entropy", "grpo/val/ratio"):
            assert a[name] == b[name], name  # the reference never reaches the loss at beta 0


def test_when_the_shortcuts_apply():
    cfg = GRPOConfig(model="m", reward=REWARD, batch_size=2, k=4, mini_batch_size=8, micro_batch_size=8, epochs=1)
    assert single_pass(cfg, 8) and not needs_reference(GRPOConfig(model="m", reward=REWARD, beta=0.0))
    assert not single_pass(cfg, 8, processes=2)  # steps 4-6 need the whole batch, which one share is not
    two_epochs = GRPOConfig(model="m", reward=REWARD, batch_size=2, k=4, mini_batch_size=8, micro_batch_size=8)
    assert not single_pass(two_epochs, 8)
    cfg.micro_batch_size = 4
    assert not single_pass(cfg, 8)  # two micro-batches
    for kw in ({"beta": 0.04}, {"beta": 0.0, "max_kl": 5.0}, {"beta": 0.0, "target_kl": 1.0}):
        assert needs_reference(GRPOConfig(model="m", reward=REWARD, **kw)), kw


def test_single_pass_and_plain_ppo_end_with_the_same_weights(model_dir, tmp_path, monkeypatch):
    from preflab.models import load_model

    run("ppo", model_dir, tmp_path / "fast", beta=0.05)
    monkeypatch.setattr(ppo_mod, "single_pass", lambda config, n, processes=1: False)
    run("ppo", model_dir, tmp_path / "plain", beta=0.05)
    a, _ = load_model(tmp_path / "fast")
    b, _ = load_model(tmp_path / "plain")
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=name)
