"""Known reward functions `f(prompt, response) -> float` for checking RL on a reward we can read.

Use them as `--reward preflab.world.rewards:<name>`. They are deliberately simple: when PPO, RLOO, GRPO or
best-of-n raise one of them on held-out prompts, the optimiser works; nothing about the tutoring world's true
utility is implied (a length target rewards padding, which the true utility punishes).
"""

from __future__ import annotations

import string

from preflab.data.text import n_words, words

TARGET_WORDS = 12
WORD = "capital"


def length_closeness(prompt, response: str, target: int = TARGET_WORDS) -> float:
    """1 at exactly `target` words, falling linearly: 1 - |n - target| / target (0 at 0 or 2x target words)."""
    return 1.0 - abs(n_words(response) - target) / target


def word_count(prompt, response: str, word: str = WORD) -> float:
    """How many times `word` appears (case-insensitive, whole words, punctuation around them ignored), capped at 5."""
    return float(min(5, sum(w.strip(string.punctuation).lower() == word for w in words(response))))
