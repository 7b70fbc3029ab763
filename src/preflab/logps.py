"""The one log-prob function: per-token and summed log-probs of completion tokens.

Serves SFT, DPO, PPO, RLOO/GRPO and evaluation, so it sits below all of them. It takes a batch in the layout of
`preflab.data.tokenize.collate` (prompts left-padded to P, completions right-padded to C) and computes the
LM head and log-softmax only on the C+1 positions that predict completion tokens (`logits_to_keep`), never
on the full [batch, length, vocab] tensor: the largest single speed-up measured for DPO on CPU (DESIGN.md).

Logits are divided by the sampling temperature (RLHF detail #3), for the policy and the reference alike.

Rows that share their prompt (a pair's chosen and rejected rows, an online group's k samples) run it once: the
prompt's columns go through the model for each distinct prompt, and its KV cache serves every row that has it
(`shared_prompt_forward`). The same arithmetic on fewer tokens, equal to the plain forward up to rounding
(tests/test_logps.py); on a DPO batch of 64-token prompts and 64-token responses a quarter of the tokens.
"""

from __future__ import annotations

import inspect
import weakref

import torch

from preflab.data.tokenize import position_ids, take

_NO_SHARED_CACHE: weakref.WeakSet = weakref.WeakSet()  # models whose cache cannot serve several rows


def cache_keyword(model) -> str:
    """The forward's name for the KV cache: `cache` in newer transformers, `past_key_values` before (a PEFT
    model's forward takes **kwargs: its base model's signature decides)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def returned_cache(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


def shared_prompt_forward(
    model, input_ids, attention_mask, prompt_length: int, end: int, prompt_kwargs: dict, rest_kwargs: dict
):
    """(outputs on the distinct prompts [U rows], each row's prompt [R], outputs on columns P..end-1 [R rows]),
    or None where sharing does not apply: no prompt is repeated, an FSDP wrapper (its parameters are gathered
    only inside its own forward), or a model whose cache is not transformers' plain `DynamicCache` (sliding
    windows, or none in training with gradient checkpointing); the caller then runs the plain forward.

    Under DDP the prompts run through the wrapped module and the responses through the wrapper: its forward,
    which readies the gradient all-reduce, runs once per backward as DDP requires, and each parameter's gradient
    (summed over both passes by autograd) is reduced once; so several processes compute what one does."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel
    from transformers.cache_utils import DynamicLayer

    P = int(prompt_length)
    if P == 0 or end <= P or isinstance(model, FullyShardedDataParallel) or model in _NO_SHARED_CACHE:
        return None
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    prompts, inverse = torch.unique(torch.cat([input_ids[:, :P], attention_mask[:, :P]], 1), dim=0, return_inverse=True)
    R, U = input_ids.shape[0], prompts.shape[0]
    if U == R:
        return None
    rows = torch.arange(R, device=input_ids.device)
    first = torch.full((U,), R, device=input_ids.device).scatter_reduce(0, inverse, rows, "amin")
    positions = position_ids(attention_mask)
    head = inner(
        input_ids=input_ids[first, :P],
        attention_mask=attention_mask[first, :P],
        position_ids=positions[first, :P],
        use_cache=True,
        **prompt_kwargs,
    )
    cache = returned_cache(head)
    if cache is None or not all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
        _NO_SHARED_CACHE.add(model)
        return None
    cache.reorder_cache(inverse)  # each row gets its prompt's keys and values (index_select: gradients flow back)
    rest = model(
        input_ids=input_ids[:, P:end],
        attention_mask=attention_mask[:, :end],
        position_ids=positions[:, P:end],
        use_cache=True,
        **{cache_keyword(inner): cache},
        **rest_kwargs,
    )
    return head, inverse, rest


def completion_logits(model, input_ids, attention_mask, prompt_length: int, share_prompt: bool = True) -> torch.Tensor:
    """Logits [B, C, V] at the positions that predict completion tokens P..P+C-1 (the last prompt position and
    the completion's first C-1); rows with the same prompt run it once (`share_prompt`)."""
    P, T = int(prompt_length), input_ids.shape[1]
    C = T - P
    if share_prompt:
        shared = shared_prompt_forward(
            model, input_ids, attention_mask, P, T - 1, {"logits_to_keep": 1}, {"logits_to_keep": 0}
        )
        if shared is not None:
            head, inverse, rest = shared
            return torch.cat([head.logits[inverse], rest.logits], 1)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
        logits_to_keep=C + 1,
    )
    return out.logits[:, :-1, :]


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in fp32; at T = 1 the logits themselves (x / 1 is x: no copy of [B, C, V] to make)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[token] for each position: [B, C]."""
    logits = scaled(logits, temperature)
    return torch.gather(logits.log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position entropy of softmax(logits / T): [B, C]."""
    logp = scaled(logits, temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def sequence_logps(
    model, batch: dict, temperature: float = 1.0, return_entropy: bool = False, share_prompt: bool = True
):
    """(per_token [B, C], summed [B]) log-probs of the completion tokens; masked positions are 0.

    With `return_entropy=True` a third value, the per-token entropy [B, C] (masked to 0), is returned.
    `share_prompt=False` runs every row's prompt itself (the plain forward; the result is the same up to rounding).
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    prompt_length = int(batch["prompt_length"])
    mask = batch["completion_mask"].to(torch.float32)
    logits = completion_logits(model, input_ids, attention_mask, prompt_length, share_prompt)
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
