"""The Bradley-Terry loss against hand-computed values (softplus(x) = log(1 + e^x) = -log sigma(-x))."""

import math

import pytest
import torch

from preflab.reward import bradley_terry_loss
from preflab.reward.loss import pair_statistics, summarise


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_batch_of_one_plain_margin_smoothing_tie():
    # z = r_w - r_l = 1: -log sigma(1) = softplus(-1)
    assert bradley_terry_loss(t(1.0), t(0.0)).item() == pytest.approx(softplus(-1), abs=1e-12)
    # margin 0.5: -log sigma(1 - 0.5)
    assert bradley_terry_loss(t(1.0), t(0.0), margin=t(0.5)).item() == pytest.approx(softplus(-0.5), abs=1e-12)
    # smoothing 0.1: -0.9 log sigma(1) - 0.1 log sigma(-1)
    expected = 0.9 * softplus(-1) + 0.1 * softplus(1)
    assert bradley_terry_loss(t(1.0), t(0.0), label_smoothing=0.1).item() == pytest.approx(expected, abs=1e-12)
    # a tie: target 0.5, and the margin is not applied to ties
    expected = 0.5 * softplus(-1) + 0.5 * softplus(1)
    got = bradley_terry_loss(t(1.0), t(0.0), margin=t(3.0), tie=torch.tensor([True])).item()
    assert got == pytest.approx(expected, abs=1e-12)


def test_batch_of_three_is_the_mean():
    chosen, rejected = t(2.0, 0.0, -1.0), t(0.0, 1.0, -1.0)  # z = 2, -1, 0
    expected = (softplus(-2) + softplus(1) + softplus(0)) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-12)


def test_batch_of_three_with_margin_smoothing_and_a_tie():
    chosen, rejected = t(2.0, 0.0, 0.0), t(0.0, 1.0, 0.0)
    margin, tie = t(1.0, 0.0, 0.5), torch.tensor([False, False, True])
    # z = 2 - 1 = 1, -1 - 0 = -1, 0 (tie: no margin); targets 0.9, 0.9, 0.5
    rows = [0.9 * softplus(-1) + 0.1 * softplus(1), 0.9 * softplus(1) + 0.1 * softplus(-1), softplus(0)]
    got = bradley_terry_loss(chosen, rejected, margin=margin, label_smoothing=0.1, tie=tie).item()
    assert got == pytest.approx(sum(rows) / 3, abs=1e-12)


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen, rejected = t(0.0, 0.5).requires_grad_(), t(0.0, 1.0).requires_grad_()
    bradley_terry_loss(chosen, rejected).backward()
    # d/dr_w of mean(-log sigma(z)) = -(1 - sigma(z)) / B
    expected = -(1 - torch.sigmoid(t(0.0, -0.5))) / 2
    torch.testing.assert_close(chosen.grad, expected)
    torch.testing.assert_close(rejected.grad, -expected)


def test_bad_smoothing_is_refused():
    with pytest.raises(ValueError, match="label_smoothing"):
        bradley_terry_loss(t(1.0), t(0.0), label_smoothing=0.5)


def test_statistics_count_strict_wins_outside_ties():
    sums = pair_statistics(t(1.0, 0.0, 2.0), t(0.0, 0.0, 3.0), torch.tensor([False, False, True]))
    assert sums["correct"] == 1.0 and sums["n_strict"] == 2.0 and sums["n"] == 3.0
    metrics = summarise(sums, loss_sum=3.0, prefix="reward")
    assert metrics["reward/accuracy"] == 0.5 and metrics["reward/loss"] == 1.0
    assert metrics["reward/margin"] == pytest.approx(0.0) and metrics["reward/chosen"] == pytest.approx(1.0)
