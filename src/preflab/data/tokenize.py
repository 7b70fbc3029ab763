"""Token space: prompt ids + completion ids, and the one batch layout every stage uses.

Encoding rules
  * a prompt given as chat messages goes through the tokenizer's chat template with the generation prompt;
    a plain-string prompt is tokenised with the tokenizer's own special tokens (one BOS where it adds one);
  * a completion is tokenised without special tokens and ends with EOS;
  * implicit-prompt string pairs are tokenised whole and split at their longest common token prefix, so the
    prompt is split off in token space, never by slicing strings;
  * truncation keeps the end of the prompt (the question is usually there) and the start of the completion.

Batch layout (`collate`): prompts LEFT-padded to a common length P, completions RIGHT-padded to C:

    [pad pad p p p | c c c eos pad]        attention_mask 0 0 1 1 1 | 1 1 1 1 0
                                           completion_mask          | 1 1 1 1 0

so every completion starts at column P, the logits needed for completion tokens are the last C+1, and the
last real token of a row is its last attention-mask 1. Position ids are `cumsum(mask) - 1` (clamped at 0),
so left padding does not change a real token's position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preflab.data.preferences import DataError, Demonstration, Preference, completion_text


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None = None
    tie: bool = False
    source: str = ""


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    source: str = ""


def encode_prompt(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return _one_bos(tokenizer, list(ids))


def _one_bos(tokenizer, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    while bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def encode_completion(tokenizer, completion: str) -> list[int]:
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return list(ids) + [tokenizer.eos_token_id]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def truncate(prompt_ids: list[int], completion_ids: list[int], max_prompt_length: int, max_completion_length: int):
    """Keep the prompt's end and the completion's start; returns (prompt, completion, truncated?)."""
    truncated = False
    if max_prompt_length and len(prompt_ids) > max_prompt_length:
        prompt_ids, truncated = prompt_ids[-max_prompt_length:], True
    if max_completion_length and len(completion_ids) > max_completion_length:
        completion_ids, truncated = completion_ids[:max_completion_length], True
    return prompt_ids, completion_ids, truncated


def encode_preference(tokenizer, pref: Preference, max_prompt_length: int = 0, max_completion_length: int = 0):
    """(TokenizedPair, truncated?) for one preference row."""
    if pref.prompt is None:  # implicit string form: split in token space
        full_c = encode_prompt(tokenizer, pref.chosen) + [tokenizer.eos_token_id]
        full_r = encode_prompt(tokenizer, pref.rejected) + [tokenizer.eos_token_id]
        k = min(common_prefix_length(full_c, full_r), len(full_c) - 1, len(full_r) - 1)
        if k == 0:
            raise DataError(
                pref.source,
                "implicit-prompt row: 'chosen' and 'rejected' share no prefix, so no prompt can be split off",
                "add a 'prompt' field",
            )
        prompt_ids, chosen_ids, rejected_ids = full_c[:k], full_c[k:], full_r[k:]
    else:
        prompt_ids = encode_prompt(tokenizer, pref.prompt)
        chosen_ids = encode_completion(tokenizer, completion_text(pref.chosen, pref.source, "chosen"))
        rejected_ids = encode_completion(tokenizer, completion_text(pref.rejected, pref.source, "rejected"))
    p1, chosen_ids, t1 = truncate(prompt_ids, chosen_ids, max_prompt_length, max_completion_length)
    _, rejected_ids, t2 = truncate(prompt_ids, rejected_ids, max_prompt_length, max_completion_length)
    pair = TokenizedPair(p1, chosen_ids, rejected_ids, pref.margin, pref.tie, pref.source)
    return pair, (t1 or t2)


def encode_demonstration(tokenizer, demo: Demonstration, max_prompt_length: int = 0, max_completion_length: int = 0):
    prompt_ids = encode_prompt(tokenizer, demo.prompt)
    completion_ids = encode_completion(tokenizer, demo.completion)
    p, c, truncated = truncate(prompt_ids, completion_ids, max_prompt_length, max_completion_length)
    return TokenizedExample(p, c, demo.source), truncated


def tokenize_rows(tokenizer, rows, max_prompt_length: int = 0, max_completion_length: int = 0):
    """Tokenise preference or demonstration rows; returns (examples, number truncated)."""
    out, n_truncated = [], 0
    for row in rows:
        if isinstance(row, Preference):
            example, truncated = encode_preference(tokenizer, row, max_prompt_length, max_completion_length)
        else:
            example, truncated = encode_demonstration(tokenizer, row, max_prompt_length, max_completion_length)
        out.append(example)
        n_truncated += int(truncated)
    return out, n_truncated


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts to P, right-pad completions to C (see the module docstring)."""
    assert len(prompts) == len(completions)
    P = max(len(p) for p in prompts)
    C = max(max(len(c) for c in completions), 1)
    B = len(prompts)
    input_ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + C), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, P - len(p) : P] = 1
        if c:
            input_ids[i, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
            attention_mask[i, P : P + len(c)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": attention_mask[:, P:].clone(),
        "prompt_length": torch.tensor(P),
    }


def take(batch: dict, index) -> dict:
    """Rows `index` (a slice or index tensor) of a `collate`-layout batch; `prompt_length` is shared, kept as is."""
    return {k: (v if k == "prompt_length" else v[index]) for k, v in batch.items()}


def pair_length(pair: TokenizedPair) -> int:
    """The tokens of a pair's longer sequence, prompt + the longer response: what its batch pads to."""
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first (0..B-1), rejected rows after (B..2B-1): one forward pass for both."""
    prompts = [p.prompt_ids for p in pairs] * 2
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    batch = collate(prompts, completions, pad_id)
    batch["margin"] = torch.tensor([p.margin if p.margin is not None else 0.0 for p in pairs], dtype=torch.float)
    batch["tie"] = torch.tensor([p.tie for p in pairs], dtype=torch.bool)
    return batch


def collate_examples(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    return collate([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """`cumsum(mask) - 1`, clamped at 0: a real token's position ignores the padding before it."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (works for left, right or both-side padding)."""
    T = attention_mask.shape[-1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=-1).values


def batches(items: list, batch_size: int):
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]
