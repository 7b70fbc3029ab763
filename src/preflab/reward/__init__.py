"""Reward models from comparisons: Bradley-Terry loss, the model (head, normalisation, ensemble), training and
evaluation."""

from preflab.reward.interface import load_reward
from preflab.reward.loss import bradley_terry_loss
from preflab.reward.model import RewardEnsemble, RewardModel, load_reward_model, reduce_ensemble

__all__ = ["load_reward", "bradley_terry_loss", "RewardModel", "RewardEnsemble", "load_reward_model", "reduce_ensemble"]
