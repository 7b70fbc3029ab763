"""Token space: exact collator tensors, one BOS, EOS at each completion end, truncation, the implicit split."""

from __future__ import annotations

import json

import pytest
import torch

from preflab.data import (
    Demonstration,
    Preference,
    TokenizedPair,
    collate,
    collate_pairs,
    encode_preference,
    encode_prompt,
    last_token_index,
    load_preferences,
    position_ids,
    tokenize_rows,
)
from preflab.data.tokenize import common_prefix_length


def test_collate_exact_tensors():
    batch = collate([[5, 6], [7]], [[8, 9, 2], [10, 2]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 8, 9, 2], [0, 7, 10, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 0]]
    assert batch["completion_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert int(batch["prompt_length"]) == 2
    assert position_ids(batch["attention_mask"]).tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 2]]
    assert last_token_index(batch["attention_mask"]).tolist() == [4, 3]


def test_collate_pairs_exact_tensors():
    pairs = [
        TokenizedPair([1, 11, 12], [20, 2], [30, 31, 32, 2], margin=1.5),
        TokenizedPair([1, 13], [21, 22, 2], [33, 2], tie=True),
    ]
    batch = collate_pairs(pairs, pad_id=0)
    # rows 0..1 chosen, rows 2..3 rejected; prompts left-padded to 3, completions right-padded to 4
    assert batch["input_ids"].tolist() == [
        [1, 11, 12, 20, 2, 0, 0],
        [0, 1, 13, 21, 22, 2, 0],
        [1, 11, 12, 30, 31, 32, 2],
        [0, 1, 13, 33, 2, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 0, 0],
    ]
    assert batch["completion_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert int(batch["prompt_length"]) == 3
    assert batch["margin"].tolist() == [1.5, 0.0]
    assert batch["tie"].tolist() == [False, True]


def test_one_bos_and_eos_at_each_completion_end(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for prompt in ("What is 2 + 3?", [{"role": "user", "content": "What is 2 + 3?"}], "<|bos|>What is 2 + 3?"):
        ids = encode_prompt(tokenizer, prompt)
        assert ids[0] == bos and ids.count(bos) == 1, (prompt, ids)
    rows = [
        Preference("What is 2 + 3?", "2 + 3 = 5.", "2 + 3 = 6.", source="t:1"),
        Preference([{"role": "user", "content": "Hi"}], "Sure! Hello.", "Go away.", source="t:2"),
    ]
    pairs, n_truncated = tokenize_rows(tokenizer, rows)
    assert n_truncated == 0
    for pair in pairs:
        for ids in (pair.chosen_ids, pair.rejected_ids):
            assert ids[-1] == eos and ids.count(eos) == 1 and bos not in ids
        assert pair.prompt_ids.count(bos) == 1 and eos not in pair.prompt_ids
    # the completion is tokenised on its own: prompt ids + completion ids, not one string
    assert pairs[0].chosen_ids[:-1] == tokenizer("2 + 3 = 5.", add_special_tokens=False)["input_ids"]


def test_truncation_keeps_prompt_end_and_completion_start_and_counts_rows(tokenizer):
    long_prompt = "What is the capital of France? " * 5
    rows = [
        Demonstration(long_prompt, "The capital of France is Paris. I hope this helps.", "t:1"),
        Demonstration("Hi", "Oz", "t:2"),
    ]
    full, n_full = tokenize_rows(tokenizer, rows)
    cut, n_cut = tokenize_rows(tokenizer, rows, max_prompt_length=6, max_completion_length=4)
    assert len(full[1].prompt_ids) <= 6 and len(full[1].completion_ids) <= 4
    assert n_full == 0 and n_cut == 1
    assert cut[0].prompt_ids == full[0].prompt_ids[-6:]
    assert cut[0].completion_ids == full[0].completion_ids[:4]
    assert cut[1].prompt_ids == full[1].prompt_ids and cut[1].completion_ids == full[1].completion_ids


def test_truncation_counts_a_pair_once(tokenizer):
    rows = [Preference("What is 2 + 3?", "2 + 3 = 5. I hope this helps.", "2 + 3 = 6.", source="t:1")]
    pairs, n = tokenize_rows(tokenizer, rows, max_completion_length=3)
    assert n == 1 and len(pairs[0].chosen_ids) == 3 and len(pairs[0].rejected_ids) == 3


@pytest.fixture(scope="module")
def hh_rows(hh_rlhf_path):
    return [json.loads(line) for _, line in zip(range(50), open(hh_rlhf_path, encoding="utf-8"))]


def test_implicit_split_on_hh_rlhf_is_in_token_space(tokenizer, hh_rows, tmp_path):
    """Rows loaded WITHOUT `prompt`: the prompt is the longest common token prefix of chosen and rejected."""
    path = tmp_path / "implicit.jsonl"
    path.write_text("".join(json.dumps({"chosen": r["chosen"], "rejected": r["rejected"]}) + "\n" for r in hh_rows))
    data = load_preferences(path)
    assert len(data) == 50 and all(p.prompt is None for p in data)
    pairs, _ = tokenize_rows(tokenizer, data.rows)
    n_exact = 0
    for row, pair in zip(hh_rows, pairs):
        explicit = encode_prompt(tokenizer, row["prompt"])
        chosen = tokenizer(row["chosen"][len(row["prompt"]) :], add_special_tokens=False)["input_ids"]
        rejected = tokenizer(row["rejected"][len(row["prompt"]) :], add_special_tokens=False)["input_ids"]
        k = common_prefix_length(chosen, rejected)
        # re-encoding the row's prompt gives a prefix of the split-off prompt; the rest is where both replies agree
        assert pair.prompt_ids == explicit + chosen[:k]
        assert pair.chosen_ids == chosen[k:] + [tokenizer.eos_token_id]
        assert pair.rejected_ids == rejected[k:] + [tokenizer.eos_token_id]
        # decoded, the split-off prompt starts with the row's `prompt` text (the split never cuts into the prompt)
        assert tokenizer.decode(pair.prompt_ids, skip_special_tokens=True).startswith(row["prompt"])
        n_exact += pair.prompt_ids == explicit
        if chosen[0] != rejected[0]:
            assert pair.prompt_ids == explicit
    # both forms agree exactly where the replies' first tokens differ; elsewhere (e.g. both replies open
    # with the same word piece) the implicit prompt also takes the shared opening tokens
    assert n_exact == sum(
        tokenizer(r["chosen"][len(r["prompt"]) :], add_special_tokens=False)["input_ids"][0]
        != tokenizer(r["rejected"][len(r["prompt"]) :], add_special_tokens=False)["input_ids"][0]
        for r in hh_rows
    )
    assert 0 < n_exact < 50


def test_explicit_form_drops_the_repeated_prompt(tokenizer, hh_rlhf_path):
    data = load_preferences(hh_rlhf_path)
    first = data.rows[0]
    raw = json.loads(open(hh_rlhf_path, encoding="utf-8").readline())
    assert first.prompt == raw["prompt"] and raw["prompt"] + first.chosen == raw["chosen"]
    pair, _ = encode_preference(tokenizer, first)
    assert pair.prompt_ids == encode_prompt(tokenizer, raw["prompt"])


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2]]
