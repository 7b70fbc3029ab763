"""The pure maths of online RL against hand-computed values."""

import math

import pytest
import torch

from preflab.policy.losses import (
    approx_kl,
    best_of_n_indices,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    grpo_advantages,
    kl_estimate,
    kl_k1,
    kl_k3,
    masked_whiten,
    rlhf_rewards,
    rloo_advantages,
)


def test_kl_estimators_hand_values_and_zero_when_equal():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    assert torch.allclose(kl_k1(logp, ref), torch.tensor([[0.5, -1.0]]))
    # k3 = exp(-x) - 1 + x, x = logp - ref
    expected = torch.tensor([[math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]])
    assert torch.allclose(kl_k3(logp, ref), expected)
    assert (kl_k3(torch.randn(4, 5), torch.randn(4, 5)) >= 0).all()
    same = torch.randn(3, 4)
    for est in ("k1", "k3"):
        assert torch.equal(kl_estimate(same, same.clone(), est), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(same, same, "k2")


def test_masked_whiten_ignores_masked_positions():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [5.0, -50.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    real = torch.tensor([1.0, 2.0, 3.0, 5.0])
    mean, std = real.mean(), real.var(unbiased=False).sqrt()
    out = masked_whiten(values, mask, shift_mean=True)
    assert torch.allclose(out[mask.bool()], (real - mean) / std, atol=1e-5)
    assert torch.equal(out[~mask.bool()], torch.zeros(4))
    # changing a masked value changes nothing
    values2 = values.clone()
    values2[0, 3], values2[1, 1] = -7.0, 1e4
    assert torch.equal(masked_whiten(values2, mask), out)
    kept = masked_whiten(values, mask, shift_mean=False)
    assert torch.allclose(kept[mask.bool()], (real - mean) / std + mean, atol=1e-5)
    assert torch.allclose(kept[mask.bool()].mean(), mean, atol=1e-5)


def test_score_lands_on_last_real_token_even_for_rows_that_stop_early():
    logp = torch.zeros(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    scores = torch.tensor([1.0, 2.0, 3.0])
    rewards, kl = rlhf_rewards(logp, logp, scores, mask, beta=0.1)
    expected = torch.tensor([[0, 0, 0, 1.0], [0, 2.0, 0, 0], [3.0, 0, 0, 0]])
    assert torch.equal(rewards, expected)
    assert torch.equal(kl, torch.zeros(3, 4))


def test_rlhf_rewards_kl_penalty_hand_values():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, 9.0]])  # the last position is a pad: no KL there
    mask = torch.tensor([[1, 1, 0]])
    rewards, kl = rlhf_rewards(logp, ref, torch.tensor([4.0]), mask, beta=0.5, estimator="k1")
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.25, 0.5 + 4.0, 0.0]]))
    _, kl3 = rlhf_rewards(logp, ref, torch.tensor([4.0]), mask, beta=0.5, estimator="k3")
    assert torch.allclose(kl3, torch.tensor([[math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0, 0.0]]))


def _gae_reference(rewards, values, mask, gamma, lam):
    B, C = rewards.shape
    adv = torch.zeros(B, C)
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_equals_hand_written_reverse_loop(gamma, lam):
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5])
    rewards, values = rewards * mask, values * mask
    adv, ret = gae(rewards, values + 5.0 * (1 - mask), mask, gamma, lam)  # pad values must not leak in
    ref = _gae_reference(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, ref, atol=1e-6)
    assert torch.allclose(ret, (ref + values) * mask, atol=1e-6)


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.4, 0.6]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert torch.allclose(ret, torch.ones(1, 3))
    assert torch.allclose(adv, torch.tensor([[0.8, 0.6, 0.4]]))


def test_clipped_policy_loss_hand_values():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]]))
    adv = torch.tensor([[1.0, 1.0, -2.0, -2.0]])
    loss, ratio, clipped = clipped_policy_loss(logp, old, adv, cliprange=0.2)
    # A>0, r=1.5 -> clipped to 1.2: -1.2 ; A>0, r=0.5: max(-0.5, -0.8) = -0.5 (unclipped)
    # A<0, r=1.1: max(2.2, 2.2) = 2.2 ; A<0, r=0.5: max(1.0, 1.6) = 1.6 (clipped)
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, 2.2, 1.6]]), atol=1e-6)
    assert torch.allclose(ratio, torch.tensor([[1.5, 0.5, 1.1, 0.5]]), atol=1e-6)
    assert clipped.tolist() == [[True, False, False, True]]


def test_clipped_value_loss_hand_values():
    old = torch.tensor([1.0, 1.0, 1.0])
    values = torch.tensor([2.0, 1.1, 0.0])
    returns = torch.tensor([0.0, 2.0, 0.0])
    loss, clipped = clipped_value_loss(values, old, returns, cliprange_value=0.5)
    # v=2: (2-0)^2=4 vs clip 1.5: 2.25 -> 2 ; v=1.1: 0.81 vs 0.81 -> 0.405 ; v=0: 0 vs clip 0.5: 0.25 -> 0.125
    assert torch.allclose(loss, torch.tensor([2.0, 0.405, 0.125]), atol=1e-6)
    assert clipped.tolist() == [False, False, True]


def test_approx_kl_and_explained_variance():
    assert torch.allclose(approx_kl(torch.tensor([0.3]), torch.tensor([0.1])), torch.tensor([0.02]))
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_rloo_baseline_hand_values():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # 2 prompts x k=3
    adv = rloo_advantages(rewards, k=3)
    # prompt 0: 1-(2+6)/2=-3, 2-(1+6)/2=-1.5, 6-(1+2)/2=4.5 ; prompt 1: 0-1.5, 0-1.5, 3-0
    assert torch.allclose(adv, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    with pytest.raises(ValueError):
        rloo_advantages(rewards, k=1)


def test_grpo_group_normalisation():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])  # 2 prompts x k=4
    adv = grpo_advantages(rewards, k=4, eps=0.0 + 1e-12)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(adv[:4], (g - 2.5) / g.std(), atol=1e-5)
    assert torch.equal(adv[4:], torch.zeros(4))  # all equal: no signal, no NaN
    assert adv[:4].mean().abs() < 1e-6


def test_best_of_n_picks_argmax_per_group():
    rewards = torch.tensor([0.1, 0.9, 0.3, 2.0, -1.0, 0.0])
    assert best_of_n_indices(rewards, 3).tolist() == [1, 3]
    assert best_of_n_indices(rewards, 2).tolist() == [1, 3, 5]
