"""Policy optimisation: PPO, RLOO/GRPO, the DPO family and best-of-n, sharing one log-prob function."""

from preflab.logps import masked_mean, sequence_logps
from preflab.policy.dpo import dpo_loss
from preflab.policy.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller
from preflab.policy.losses import (
    best_of_n_indices,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    grpo_advantages,
    kl_estimate,
    kl_k1,
    kl_k3,
    masked_whiten,
    rlhf_rewards,
    rloo_advantages,
)

__all__ = [
    "dpo_loss",
    "masked_mean",
    "sequence_logps",
    "AdaptiveKLController",
    "FixedKLController",
    "make_kl_controller",
    "best_of_n_indices",
    "clipped_policy_loss",
    "clipped_value_loss",
    "gae",
    "grpo_advantages",
    "kl_estimate",
    "kl_k1",
    "kl_k3",
    "masked_whiten",
    "rlhf_rewards",
    "rloo_advantages",
]
