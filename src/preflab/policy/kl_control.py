"""The KL coefficient beta: fixed, or adapted toward a target KL (Ziegler et al. 2019, section 2.2).

The adaptive controller is a proportional controller on log beta:

    e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_t+1 = beta_t (1 + K_beta e_t)   with K_beta = n_steps / horizon

where KL_t is the mean per-sequence KL to the reference (summed over tokens) of the rollout batch just used
and n_steps the number of sequences in it (RLHF detail #12; Ziegler: beta 0.15, target 6 nats, horizon 10000).
"""

from __future__ import annotations


class FixedKLController:
    """beta never moves."""

    def __init__(self, beta: float):
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """beta rises when the KL is above target and falls when below, by at most 20% x n_steps/horizon per update."""

    def __init__(self, init_beta: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target} and {horizon}")
        self.value, self.target, self.horizon = float(init_beta), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)  # Ziegler et al. 2019, sec. 2.2
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def make_kl_controller(beta: float, target_kl: float = 0.0, horizon: int = 10000):
    """Adaptive when `target_kl > 0`, fixed otherwise."""
    if target_kl and target_kl > 0:
        return AdaptiveKLController(beta, target_kl, horizon)
    return FixedKLController(beta)
