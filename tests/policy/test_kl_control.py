"""The KL coefficient controllers (Ziegler et al. 2019)."""

import pytest

from preflab.policy.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller


@pytest.mark.parametrize(
    "kl, expected",
    [
        # beta_1 = 0.1 * (1 + e * 100 / 1000), e = clip(KL / 6 - 1, -0.2, 0.2), worked by hand:
        (6.6, 0.101),  # e = +0.1: above target, beta grows by the factor 1.01
        (9.0, 0.102),  # e = +0.5, clipped to +0.2: factor 1.02, not 1.05
        (60.0, 0.102),  # e = +9, clipped to +0.2
        (6.0, 0.1),  # on target: beta stays
        (5.4, 0.099),  # e = -0.1: below target, beta shrinks by the factor 0.99
        (0.0, 0.098),  # e = -1, clipped to -0.2: factor 0.98, not 0.9
    ],
)
def test_adaptive_moves_beta_by_ziegler_factor(kl, expected):
    controller = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert controller.update(kl, n_steps=100) == pytest.approx(expected, abs=1e-12)
    assert controller.value == pytest.approx(expected, abs=1e-12)


def test_adaptive_compounds_in_the_right_direction_and_scales_with_batch_size():
    high = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    betas = [high.update(9.0, n_steps=100) for _ in range(3)]
    assert betas == pytest.approx([0.102, 0.10404, 0.1061208], abs=1e-12)  # 0.1 * 1.02 ** t: rising
    low = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    betas = [low.update(3.0, n_steps=100) for _ in range(2)]
    assert betas == pytest.approx([0.098, 0.09604], abs=1e-12)  # 0.1 * 0.98 ** t: falling
    # K_beta = n_steps / horizon: ten times the sequences, ten times the step (factor 1.2, still clipped e)
    assert AdaptiveKLController(0.1, 6.0, 1000).update(9.0, n_steps=1000) == pytest.approx(0.12, abs=1e-12)


def test_fixed_never_moves_and_factory_picks():
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 64) == 0.05
    assert isinstance(make_kl_controller(0.05, 0.0), FixedKLController)
    assert isinstance(make_kl_controller(0.05, 6.0, 100), AdaptiveKLController)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
