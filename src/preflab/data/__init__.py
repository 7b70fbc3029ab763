"""Data: preference and demonstration files, validation with file:line errors, tokenisation and batching."""

from preflab.data.preferences import (
    DataError,
    DataSet,
    Demonstration,
    Preference,
    load_demonstrations,
    load_preferences,
    load_prompts,
    split_rows,
    write_jsonl,
)
from preflab.data.text import n_words, words
from preflab.data.tokenize import (
    TokenizedExample,
    TokenizedPair,
    collate,
    collate_examples,
    collate_pairs,
    encode_completion,
    encode_preference,
    encode_prompt,
    last_token_index,
    pair_length,
    position_ids,
    tokenize_rows,
)

__all__ = [
    "DataError",
    "DataSet",
    "Demonstration",
    "Preference",
    "load_demonstrations",
    "load_preferences",
    "load_prompts",
    "split_rows",
    "write_jsonl",
    "TokenizedExample",
    "TokenizedPair",
    "collate",
    "collate_examples",
    "collate_pairs",
    "pair_length",
    "encode_completion",
    "encode_preference",
    "encode_prompt",
    "last_token_index",
    "position_ids",
    "tokenize_rows",
    "n_words",
    "words",
]
