"""The reward both libraries' online methods use: a cheap function of the text, so rollouts and training
(not a reward model) are what is timed."""

from __future__ import annotations


def digit_reward(prompt, response: str) -> float:
    """preflab's interface, f(prompt, response) -> float: the share of the response that is the digit 7."""
    return response.count("7") / max(len(response), 1)


def trl_digit_reward(prompts, completions, **kwargs) -> list[float]:
    """TRL's interface for the same function: (prompts, completions, **columns) -> list of floats."""
    return [digit_reward(p, c) for p, c in zip(prompts, completions)]
