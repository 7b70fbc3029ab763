"""The one rollout engine: batched, KV-cached sampling with per-token log-probs.

Behind `preflab generate`, PPO, RLOO, GRPO, best-of-n, evaluation and the collection app. Prompts are
left-padded with position ids `cumsum(mask) - 1` (RLHF detail #2); the logits are divided by the
temperature before sampling and before the log-prob is recorded (detail #3); pure sampling by default
(top-k 0, top-p 1), so the recorded log-probs are those of the policy being trained. A row stops at its
first EOS (detail #4); tokens after it are pad with mask 0, and `finished` says which rows reached EOS.

The result is laid out exactly as `preflab.data.tokenize.collate` lays out training batches, so
`sequence_logps(model, rollout.batch)` recomputes the same log-probs with one full forward pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from preflab.data.tokenize import collate, position_ids
from preflab.logps import cache_keyword, returned_cache


@dataclass
class Rollout:
    batch: dict  # collate layout: input_ids, attention_mask, completion_mask, prompt_length
    logps: torch.Tensor  # [B, C] log-prob of each sampled token at temperature T (0 where masked)
    completion_ids: list  # per row: the sampled ids, EOS included when reached
    texts: list  # per row: the completion decoded without special tokens
    finished: torch.Tensor  # [B] bool: the row ended with EOS

    @property
    def lengths(self) -> torch.Tensor:
        return self.batch["completion_mask"].sum(-1)


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_rows(probs: torch.Tensor, rows: list[int] | None, n_rows: int, generator) -> torch.Tensor:
    """One token per row of `probs` [B, V] by the inverse CDF: u ~ U[0, 1) per row, the token is the first whose
    cumulative probability (float64) exceeds u x the row's total, so a zero-probability token is never drawn.
    One uniform a row, where `torch.multinomial` draws an exponential for every entry of [B, V]: that draw was
    30% of the decode loop at vocabulary 8,000 and batch 8 (docs/benchmarks.md), and transformers' `generate`
    pays it too. The uniforms are drawn for the whole `n_rows`-row batch and `rows` kept (`rows=None`: all),
    so one process of several, holding only its rows of the batch, draws the tokens one process draws and
    leaves the generator where one process would (tests/test_rollout.py)."""
    u = _uniforms(n_rows, probs.device, generator)
    if rows is not None:
        u = u[rows]
    cdf = probs.double().cumsum(-1)
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    if bool((token == probs.shape[-1]).any()):  # u x total rounded up to the total: the last possible token
        token = torch.minimum(token, (probs > 0).cumsum(-1).argmax(-1))
    return token


def _uniforms(n_rows: int, device, generator) -> torch.Tensor:
    """The draws of one sampled token for an `n_rows`-row batch: every process makes exactly these (sampling or
    idle), so the generators stay in step."""
    return torch.rand(n_rows, dtype=torch.float64, device=device, generator=generator)


def _idle_batch(n_rows, max_new_tokens, greedy, generator, all_done, device):
    """A process without rows in a chunk: the same draws from `generator` and the same `all_done` calls as the
    processes that sample, so every generator stays in step."""
    for _ in range(max_new_tokens):
        if not greedy:
            _uniforms(n_rows, device, generator)
        if all_done(True):
            break
    return [], torch.zeros(0, 0), torch.zeros(0, dtype=torch.bool)


def _preallocate_cache(cache, capacity: int) -> None:
    """Give each layer of a `transformers` DynamicCache a buffer of `capacity` positions, so that the decode loop
    writes each new key and value in place instead of concatenating the whole cache every token. The keys and
    values handed to attention are views of the filled part, with the same values as the concatenated ones.
    Any other cache (a model's own, a sliding window) is left as it is."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    if type(cache) is not DynamicCache or not all(type(layer) is DynamicLayer for layer in cache.layers):
        return
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys.dim() != 4 or layer.keys.shape[-2] >= capacity:
            continue
        layer.__class__ = _buffered_layer_class()
        layer.grow_into(capacity)


@functools.cache
def _buffered_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(DynamicLayer):
        """A DynamicLayer whose keys and values live in a preallocated buffer (see `_preallocate_cache`)."""

        def grow_into(self, capacity: int) -> None:
            B, H, L, D = self.keys.shape
            self.key_buffer = self.keys.new_empty(B, H, capacity, D)
            self.value_buffer = self.values.new_empty(B, H, capacity, self.values.shape[-1])
            self.key_buffer[..., :L, :] = self.keys
            self.value_buffer[..., :L, :] = self.values
            self.keys, self.values = self.key_buffer[..., :L, :], self.value_buffer[..., :L, :]

        def update(self, key_states, value_states, *args, **kwargs):
            L, n = self.keys.shape[-2], key_states.shape[-2]
            if L + n > self.key_buffer.shape[-2]:  # past the buffer: grow by concatenation, as DynamicLayer does
                return super().update(key_states, value_states, *args, **kwargs)
            self.key_buffer[..., L : L + n, :] = key_states
            self.value_buffer[..., L : L + n, :] = value_states
            self.keys, self.values = self.key_buffer[..., : L + n, :], self.value_buffer[..., : L + n, :]
            return self.keys, self.values

    return BufferedLayer


@torch.no_grad()
def _generate_batch(
    model,
    prompts,
    eos_id,
    pad_id,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    greedy,
    generator,
    rows=None,
    all_done=None,
):
    """One batch through the decode loop: a prefill forward over the prompts, then one cached forward per token.

    Per token it does what sampling needs and no more: the temperature division only when T != 1 (x / 1 is x),
    one softmax of the (filtered) logits for sampling, and, when nothing is filtered, the sampled token's log-prob
    read off that softmax (log p[token]) instead of a second pass over the vocabulary for the log-softmax; the
    attention mask, positions, tokens and log-probs are preallocated and filled in place, and a `transformers`
    DynamicCache gets a preallocated buffer after the prefill (`_preallocate_cache`). The sampled tokens are the
    same as with the plain loop (the same softmax goes to the same sampler, `sample_rows`, with the same
    generator: tests/test_rollout.py checks it against a copy of the plain loop); the log-probs agree within
    rounding (1e-6), as they do with `sequence_logps`' full forward.

    With `rows` (one process of several: `policy/online.py`) it samples only those rows of the batch, drawing the
    whole batch's noise (`sample_rows`), and asks `all_done` whether every process's rows have ended."""
    device = next(model.parameters()).device
    batch = collate(prompts, [[]] * len(prompts), pad_id)
    P = int(batch["prompt_length"])
    input_ids = batch["input_ids"][:, :P].to(device)
    prompt_mask = batch["attention_mask"][:, :P].to(device)
    if rows is not None:  # one process's rows, padded as the whole batch is
        input_ids, prompt_mask = input_ids[rows], prompt_mask[rows]
        if not rows:  # none of this chunk: draw the chunk's noise and wait for the others, as if sampling
            return _idle_batch(len(prompts), max_new_tokens, greedy, generator, all_done, device)
    B = input_ids.shape[0]
    attention_buffer = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=device)
    attention_buffer[:, :P] = prompt_mask
    attention = attention_buffer[:, :P]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(B, max_new_tokens, device=device)
    filtered = bool(top_k and top_k > 0) or top_p < 1.0
    cache = None
    cache_kw = cache_keyword(model)
    step_ids, step_pos = input_ids, position_ids(attention)
    seen = attention.sum(-1, keepdim=True)  # real tokens so far per row: the next token's position + 1
    n = 0
    for t in range(max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=attention,
            position_ids=step_pos,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kw: cache},
        )
        cache = returned_cache(out)
        if t == 0:
            _preallocate_cache(cache, P + max_new_tokens)
        logits = out.logits[:, -1, :].float()
        if temperature != 1.0:
            logits = logits / temperature
        if greedy:
            token = logits.argmax(-1)
            logp = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
        else:
            probs = _filter_logits(logits, top_k, top_p).softmax(-1)
            token = sample_rows(probs, rows, len(prompts), generator)
            if filtered:  # the recorded log-prob is the unfiltered policy's
                logp = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
            else:
                logp = probs.gather(-1, token[:, None]).squeeze(-1).log()
        alive = ~done
        tokens[:, t] = torch.where(done, pad_id, token)
        logps[:, t] = torch.where(done, 0.0, logp)
        done = done | (tokens[:, t] == eos_id)
        n = t + 1
        attention_buffer[:, P + t] = alive
        attention = attention_buffer[:, : P + n]
        seen = seen + alive[:, None]
        step_ids = tokens[:, t : t + 1]
        step_pos = (seen - 1).clamp(min=0)
        if bool(done.all()) if all_done is None else all_done(bool(done.all())):
            break
    tokens = tokens[:, :n].cpu()
    logps = logps[:, :n].cpu()
    completions = []
    for i in range(B):
        row = tokens[i].tolist()
        completions.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return completions, logps, done.cpu()


def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    rows: list[int] | None = None,
    all_done=None,
) -> Rollout:
    """Sample one completion per prompt (repeat a prompt in the list for several samples).

    With `rows` (one process of several; `all_done(flag)` is True when every process's rows are done) the
    result holds only `prompts[rows]`, sampled exactly as one process sampling all of `prompts` would sample
    them: each process walks the same chunks, pads as the whole chunk pads, draws the whole chunk's noise and
    stops when every process's rows are done (`sample_rows`)."""
    was_training = model.training
    model.eval()
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert pad_id != eos_id, "pad must differ from eos (see preflab.models.ensure_pad_token)"
    completions, logps, finished = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        mine = None if rows is None else [i - start for i in rows if start <= i < start + len(chunk)]
        c, lp, f = _generate_batch(
            model, chunk, eos_id, pad_id, max_new_tokens, temperature, top_k, top_p, greedy, generator, mine, all_done
        )
        completions += c
        logps += list(lp)  # one row each
        finished.append(f)
    if was_training:
        model.train()
    kept = prompts if rows is None else [prompts[i] for i in rows]
    batch = collate(kept, completions, pad_id)
    C = batch["completion_mask"].shape[1]
    padded = torch.zeros(len(kept), C)
    for i, lp in enumerate(logps):
        padded[i, : min(C, lp.shape[0])] = lp[:C]
    padded = padded * batch["completion_mask"]
    texts = tokenizer.batch_decode([[t for t in c if t != eos_id] for c in completions], skip_special_tokens=True)
    return Rollout(batch=batch, logps=padded, completion_ids=completions, texts=texts, finished=torch.cat(finished))
