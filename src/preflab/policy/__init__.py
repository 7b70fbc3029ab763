"""Policy optimisation: PPO, RLOO/GRPO, the DPO family and best-of-n, sharing one log-prob function."""

from preflab.policy.logps import masked_mean, sequence_logps

__all__ = ["masked_mean", "sequence_logps"]
