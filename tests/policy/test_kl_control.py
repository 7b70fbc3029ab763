"""The KL coefficient controllers (Ziegler et al. 2019)."""

import pytest

from preflab.policy.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller


def test_adaptive_raises_beta_above_target_and_lowers_below():
    up = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert up.update(9.0, n_steps=100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))   # error clipped to 0.2
    down = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert down.update(5.4, n_steps=100) == pytest.approx(0.1 * (1 - 0.1 * 100 / 1000))  # error -0.1
    on_target = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert on_target.update(6.0, n_steps=100) == pytest.approx(0.1)
    far_below = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert far_below.update(0.0, n_steps=100) == pytest.approx(0.1 * (1 - 0.2 * 0.1))     # clipped at -0.2


def test_fixed_never_moves_and_factory_picks():
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 64) == 0.05
    assert isinstance(make_kl_controller(0.05, 0.0), FixedKLController)
    assert isinstance(make_kl_controller(0.05, 6.0, 100), AdaptiveKLController)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
