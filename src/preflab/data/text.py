"""Words: the one unit of length that does not depend on a tokenizer.

Every length measured in words (the annotators' planted length bias, the bias audit's regression, the known
length rewards) counts the same thing: the whitespace-separated pieces of a text, punctuation attached, so
"Sure! 2 + 3 = 5." is six words. Lengths in tokens come from the tokenizer, never from here.
"""

from __future__ import annotations


def words(text: str) -> list[str]:
    """The whitespace-separated pieces of `text` ("Paris." is one word; "2 + 3" is three)."""
    return text.split()


def n_words(text: str) -> int:
    """The length of `text` in words (see `words`)."""
    return len(words(text))
