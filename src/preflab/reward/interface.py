"""The one reward interface: `reward(prompts, responses) -> torch.Tensor` of floats, one per response.

`load_reward(spec)` turns a spec into such a callable:
  * `world`                 the tutoring world's true utility (the lab's ground truth; never a training signal
                            in the lab's reported runs unless you ask for it);
  * `module:function`       a Python function `f(prompt, response) -> float`, called once per pair;
  * a reward-model folder   a trained reward model (`preflab.reward.model.RewardModel`) or an ensemble
                            (`RewardEnsemble`, reduced by mean / min / mean-minus-std), scored in batches.
Prompts are given as the data gives them (a string or a list of chat messages); responses are strings.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch

from preflab.models import ModelError

RewardFn = Callable[[list, list], torch.Tensor]


def function_reward(fn: Callable) -> RewardFn:
    def reward(prompts: list, responses: list[str]) -> torch.Tensor:
        return torch.tensor([float(fn(p, r)) for p, r in zip(prompts, responses)], dtype=torch.float32)

    reward.__name__ = getattr(fn, "__name__", "reward")
    return reward


def load_reward(spec: str) -> RewardFn:
    if spec == "world":
        from preflab.world import true_utility

        return function_reward(lambda p, r: true_utility(p, r).total)
    if ":" in spec and not Path(spec).exists():
        module, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ModelError(f"reward {spec!r}: cannot import {name} from {module} ({exc})") from None
        return function_reward(fn)
    from preflab.reward.model import load_reward_model  # a trained reward-model (or ensemble) folder

    return load_reward_model(spec).reward  # the bound method: `.__self__` is the RewardModel / RewardEnsemble
