"""Reward models from comparisons: Bradley-Terry loss, the model (head, normalisation, ensemble), training, evaluation."""

from preflab.reward.interface import load_reward

__all__ = ["load_reward"]
