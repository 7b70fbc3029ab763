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

import inspect
from dataclasses import dataclass

import torch

from preflab.data.tokenize import collate, position_ids


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


def sample_rows(probs: torch.Tensor, rows: list[int], n_rows: int, generator) -> torch.Tensor:
    """`torch.multinomial(all_probs, 1, generator)[rows]` for one process holding only `probs = all_probs[rows]`
    of an `n_rows`-row batch: multinomial draws one sample as argmax(p / q), q ~ Exp(1) drawn for the whole
    [n_rows, V] tensor, so drawing that whole q here and keeping our rows gives the same tokens, bit for bit, and
    leaves the generator where one process would (checked in tests/test_rollout.py)."""
    q = torch.empty((n_rows, probs.shape[-1]), dtype=probs.dtype, device=probs.device).exponential_(
        1, generator=generator
    )
    return (probs / q[rows]).argmax(-1)


def _idle_batch(model, n_rows, max_new_tokens, greedy, generator, all_done, device):
    """A process without rows in a chunk: the same draws from `generator` and the same `all_done` calls as the
    processes that sample, so every generator stays in step."""
    vocab = model.get_output_embeddings().weight.shape[0]
    for _ in range(max_new_tokens):
        if not greedy:
            torch.empty((n_rows, vocab), device=device).exponential_(1, generator=generator)
        if all_done(True):
            break
    return [], torch.zeros(0, 0), torch.zeros(0, dtype=torch.bool)


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
    device = next(model.parameters()).device
    batch = collate(prompts, [[]] * len(prompts), pad_id)
    P = int(batch["prompt_length"])
    input_ids = batch["input_ids"][:, :P].to(device)
    attention = batch["attention_mask"][:, :P].to(device)
    if rows is not None:  # one process's rows, padded as the whole batch is
        input_ids, attention = input_ids[rows], attention[rows]
        if not rows:  # none of this chunk: draw the chunk's noise and wait for the others, as if sampling
            return _idle_batch(model, len(prompts), max_new_tokens, greedy, generator, all_done, device)
    B = input_ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logps = [], []
    cache = None
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    step_ids, step_pos = input_ids, position_ids(attention)
    for _ in range(max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=attention,
            position_ids=step_pos,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kw: cache},
        )
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        logits = out.logits[:, -1, :].float() / temperature
        if greedy:
            token = logits.argmax(-1)
        elif rows is None:
            probs = _filter_logits(logits, top_k, top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            token = sample_rows(_filter_logits(logits, top_k, top_p).softmax(-1), rows, len(prompts), generator)
        logp = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        logps.append(torch.where(done, torch.zeros_like(logp), logp))
        alive = (~done).long()
        done = done | (token == eos_id)
        attention = torch.cat([attention, alive[:, None]], dim=1)
        step_ids = token[:, None]
        step_pos = (attention.sum(-1, keepdim=True) - 1).clamp(min=0)
        if bool(done.all()) if all_done is None else all_done(bool(done.all())):
            break
    tokens = torch.stack(tokens, 1).cpu()
    logps = torch.stack(logps, 1).cpu()
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
    if rows is not None:
        return _generate_rows(
            model,
            tokenizer,
            prompts,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            greedy,
            batch_size,
            generator,
            rows,
            all_done,
        )
    was_training = model.training
    model.eval()
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert pad_id != eos_id, "pad must differ from eos (see preflab.models.ensure_pad_token)"
    completions, logps, finished = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        c, lp, f = _generate_batch(
            model, chunk, eos_id, pad_id, max_new_tokens, temperature, top_k, top_p, greedy, generator
        )
        completions += c
        logps.append(lp)
        finished.append(f)
    if was_training:
        model.train()
    batch = collate(prompts, completions, pad_id)
    C = batch["completion_mask"].shape[1]
    padded = torch.zeros(len(prompts), C)
    row = 0
    for lp in logps:
        padded[row : row + lp.shape[0], : min(C, lp.shape[1])] = lp[:, :C]
        row += lp.shape[0]
    padded = padded * batch["completion_mask"]
    texts = tokenizer.batch_decode([[t for t in c if t != eos_id] for c in completions], skip_special_tokens=True)
    return Rollout(batch=batch, logps=padded, completion_ids=completions, texts=texts, finished=torch.cat(finished))


def _generate_rows(
    model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, greedy, batch_size, generator, rows, all_done
) -> Rollout:
    """`generate` over `prompts[rows]` only, as one process sampling all of `prompts` samples them."""
    was_training = model.training
    model.eval()
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert pad_id != eos_id, "pad must differ from eos (see preflab.models.ensure_pad_token)"
    completions, logps, finished = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        mine = [i - start for i in rows if start <= i < start + len(chunk)]
        c, lp, f = _generate_batch(
            model, chunk, eos_id, pad_id, max_new_tokens, temperature, top_k, top_p, greedy, generator, mine, all_done
        )
        completions += c
        logps += list(lp)
        finished.append(f)
    if was_training:
        model.train()
    batch = collate([prompts[i] for i in rows], completions, pad_id)
    C = batch["completion_mask"].shape[1]
    padded = torch.zeros(len(rows), C)
    for i, lp in enumerate(logps):
        padded[i, : min(C, lp.shape[0])] = lp[:C]
    padded = padded * batch["completion_mask"]
    texts = tokenizer.batch_decode([[t for t in c if t != eos_id] for c in completions], skip_special_tokens=True)
    return Rollout(batch=batch, logps=padded, completion_ids=completions, texts=texts, finished=torch.cat(finished))
