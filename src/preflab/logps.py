"""The one log-prob function: per-token and summed log-probs of completion tokens.

Serves SFT, DPO, PPO, RLOO/GRPO and evaluation, so it sits below all of them. It takes a batch in the layout of
`preflab.data.tokenize.collate` (prompts left-padded to P, completions right-padded to C) and computes the
LM head and log-softmax only on the C+1 positions that predict completion tokens (`logits_to_keep`), never
on the full [batch, length, vocab] tensor: the largest single speed-up measured for DPO on CPU (DESIGN.md).

Logits are divided by the sampling temperature (RLHF detail #3), for the policy and the reference alike.
"""

from __future__ import annotations

import torch

from preflab.data.tokenize import position_ids, take


def completion_logits(model, input_ids, attention_mask, prompt_length: int) -> torch.Tensor:
    """Logits [B, C, V] at the positions that predict completion tokens P..P+C-1."""
    C = input_ids.shape[1] - int(prompt_length)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
        logits_to_keep=C + 1,
    )
    return out.logits[:, :-1, :]


def token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[token] for each position: [B, C]."""
    logits = logits.float() / temperature
    return torch.gather(logits.log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position entropy of softmax(logits / T): [B, C]."""
    logp = (logits.float() / temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def sequence_logps(model, batch: dict, temperature: float = 1.0, return_entropy: bool = False):
    """(per_token [B, C], summed [B]) log-probs of the completion tokens; masked positions are 0.

    With `return_entropy=True` a third value, the per-token entropy [B, C] (masked to 0), is returned.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    prompt_length = int(batch["prompt_length"])
    mask = batch["completion_mask"].to(torch.float32)
    logits = completion_logits(model, input_ids, attention_mask, prompt_length)
    per_token = token_logps(logits, input_ids[:, prompt_length:], temperature) * mask
    if return_entropy:
        entropy = entropy_from_logits(logits.detach(), temperature) * mask
        return per_token, per_token.sum(-1), entropy
    return per_token, per_token.sum(-1)


@torch.no_grad()
def chunked_logps(model, batch: dict, temperature: float, chunk: int, entropy: bool = False):
    """`sequence_logps`' per-token log-probs [B, C] (and entropies) without gradients, `chunk` rows at a time."""
    parts, ents = [], []
    for start in range(0, batch["input_ids"].shape[0], chunk):
        out = sequence_logps(model, take(batch, slice(start, start + chunk)), temperature, return_entropy=entropy)
        parts.append(out[0])
        if entropy:
            ents.append(out[2])
    return (torch.cat(parts), torch.cat(ents)) if entropy else torch.cat(parts)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)
