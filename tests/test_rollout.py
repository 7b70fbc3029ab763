"""The rollout engine: left padding is harmless, log-probs match `sequence_logps`, EOS stops a row, T divides logits."""

from __future__ import annotations

import inspect

import pytest
import torch

from preflab.data import collate, encode_prompt
from preflab.policy import sequence_logps
from preflab.rollout import generate


@pytest.fixture
def prompts(tokenizer):
    return [
        encode_prompt(tokenizer, [{"role": "user", "content": q}])
        for q in ("What is 2 + 3?", "What is the capital of France? Tell me, please, what it is.")
    ]


def eos_boost(model, tokenizer, bias: float):
    """Raise the EOS logit by `bias` so that a random micro model stops at varied lengths."""
    boost = torch.zeros(len(tokenizer))
    boost[tokenizer.eos_token_id] = bias
    return model.lm_head.register_forward_hook(lambda module, inputs, output: output + boost)


def test_left_padding_does_not_change_a_real_tokens_logp(model, tokenizer, prompts):
    short, long = prompts
    assert len(long) > len(short) + 5
    completion = [7, 8, 9, 10, tokenizer.eos_token_id]
    alone = sequence_logps(model, collate([short], [completion], tokenizer.pad_token_id))[0]
    batched = collate([short, long], [completion, [11, 12, tokenizer.eos_token_id]], tokenizer.pad_token_id)
    assert batched["attention_mask"][0, : len(long) - len(short)].sum() == 0  # the short prompt is left-padded
    in_batch = sequence_logps(model, batched)[0]
    torch.testing.assert_close(in_batch[0], alone[0], atol=1e-5, rtol=0)
    # the engine too: greedy tokens and their log-probs are the same alone and next to a longer prompt
    g_alone = generate(model, tokenizer, [short], max_new_tokens=8, greedy=True)
    g_batch = generate(model, tokenizer, [short, long], max_new_tokens=8, greedy=True)
    assert g_batch.completion_ids[0] == g_alone.completion_ids[0]
    n = len(g_alone.completion_ids[0])
    torch.testing.assert_close(g_batch.logps[0, :n], g_alone.logps[0, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logps_equal_sequence_logps_of_its_batch(model, tokenizer, prompts, temperature):
    hook = eos_boost(model, tokenizer, 4.0)
    rollout = generate(
        model,
        tokenizer,
        prompts * 4,
        max_new_tokens=12,
        temperature=temperature,
        generator=torch.Generator().manual_seed(0),
    )
    recomputed, summed = sequence_logps(model, rollout.batch, temperature=temperature)
    hook.remove()
    torch.testing.assert_close(rollout.logps, recomputed, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.logps.sum(-1), summed, atol=1e-4, rtol=0)


def test_stops_at_eos_and_pads_after(model, tokenizer, prompts):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    hook = eos_boost(model, tokenizer, 4.0)
    rollout = generate(model, tokenizer, prompts * 16, max_new_tokens=10, generator=torch.Generator().manual_seed(1))
    hook.remove()
    lengths = [len(c) for c in rollout.completion_ids]
    assert rollout.finished.any() and not rollout.finished.all() and len(set(lengths)) > 2  # varied endings
    P = int(rollout.batch["prompt_length"])
    for i, ids in enumerate(rollout.completion_ids):
        assert bool(rollout.finished[i]) == (ids[-1] == eos) and ids.count(eos) <= 1
        assert len(ids) == 10 or ids[-1] == eos
        row = rollout.batch["input_ids"][i, P:]
        mask = rollout.batch["completion_mask"][i]
        assert row[: len(ids)].tolist() == ids and mask[: len(ids)].sum() == len(ids)
        assert (
            (row[len(ids) :] == pad).all() and mask[len(ids) :].sum() == 0 and (rollout.logps[i, len(ids) :] == 0).all()
        )
        assert eos not in tokenizer.encode(rollout.texts[i], add_special_tokens=False)


def test_temperature_divides_logits(model, tokenizer, prompts):
    prompt = prompts[0]
    T = 0.5
    rollout = generate(
        model, tokenizer, [prompt], max_new_tokens=1, temperature=T, generator=torch.Generator().manual_seed(2)
    )
    token = rollout.completion_ids[0][0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    expected = (logits / T).log_softmax(-1)[token]
    torch.testing.assert_close(rollout.logps[0, 0], expected, atol=1e-5, rtol=0)
    assert abs(float(logits.log_softmax(-1)[token]) - float(expected)) > 1e-3  # T = 1 would differ


def test_the_sampler_draws_each_token_with_its_probability_and_never_a_zero_one(monkeypatch):
    """Inverse-CDF sampling (`sample_rows`): 40,000 draws per row of two distributions with zeros in them (first,
    middle and last place); each token's share within 4.5 standard errors of its probability, zeros never."""
    from preflab.rollout import sample_rows

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.1, 0.0, 0.6, 0.0, 0.0, 0.3]])
    generator = torch.Generator().manual_seed(0)
    n = 40_000
    draws = torch.stack([sample_rows(probs, None, 2, generator) for _ in range(n)])  # [n, 2]
    for row in range(2):
        share = torch.bincount(draws[:, row], minlength=6).double() / n
        p = probs[row].double()
        assert (share[p == 0] == 0).all()
        assert ((share - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt()).all(), (row, share, p)
    # all the mass on the last token: always that token
    assert sample_rows(torch.tensor([[0.0, 0.0, 1.0]]), None, 1, generator).tolist() == [2]
    # u x total rounding up to the total (u = 1 forced) gives the last token of positive probability, not a zero
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.ones(n, dtype=torch.float64))
    assert sample_rows(probs, None, 2, generator).tolist() == [4, 5]


def test_processes_sampling_their_rows_draw_the_one_process_rollout(model, tokenizer, prompts):
    """Three 'processes' (threads, a barrier for the all-done vote), each sampling every third row, draw the
    tokens one process draws: chunks of 4 over 14 prompts (the last chunk leaves a process without rows) and rows
    ending at varied lengths (the chunk stops when every process's rows are done)."""
    import threading

    from preflab.rollout import sample_rows

    probs = torch.rand(5, 50).softmax(-1)
    g_one, g_part = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    one = sample_rows(probs, None, 5, g_one)
    assert sample_rows(probs[[1, 4]], [1, 4], 5, g_part).tolist() == one[[1, 4]].tolist()
    assert torch.equal(torch.rand(3, generator=g_one), torch.rand(3, generator=g_part))  # the generators in step

    hook = eos_boost(model, tokenizer, 3.0)
    many = (prompts * 7)[:14]
    kw = dict(max_new_tokens=10, batch_size=4)
    whole = generate(model, tokenizer, many, generator=torch.Generator().manual_seed(5), **kw)
    world, flags, barrier, parts = 3, [False] * 3, threading.Barrier(3), [None] * 3

    def process(k):
        def all_done(flag):
            flags[k] = flag
            barrier.wait()
            done = all(flags)
            barrier.wait()
            return done

        rows = list(range(k, len(many), world))
        generator = torch.Generator().manual_seed(5)
        parts[k] = (rows, generate(model, tokenizer, many, generator=generator, rows=rows, all_done=all_done, **kw))

    threads = [threading.Thread(target=process, args=(k,)) for k in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hook.remove()
    assert whole.finished.any() and not whole.finished.all()
    for rows, part in parts:
        assert part.completion_ids == [whole.completion_ids[i] for i in rows]
        assert part.texts == [whole.texts[i] for i in rows]
        assert part.finished.tolist() == whole.finished[rows].tolist()
        n = part.logps.shape[1]
        torch.testing.assert_close(part.logps, whole.logps[rows, :n], atol=1e-5, rtol=0)


@torch.no_grad()
def plain_decode(model, prompts, eos_id, pad_id, max_new_tokens, temperature, top_k, top_p, greedy, generator):
    """The decode loop before it was optimised (the reference the engine must match): a concatenated attention
    mask, HF's own growing cache, the temperature division and a full log-softmax every token."""
    from preflab.data.tokenize import position_ids
    from preflab.rollout import _filter_logits, sample_rows

    batch = collate(prompts, [[]] * len(prompts), pad_id)
    P = int(batch["prompt_length"])
    input_ids, attention = batch["input_ids"][:, :P], batch["attention_mask"][:, :P]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    tokens, logps, cache = [], [], None
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
        else:
            probs = _filter_logits(logits, top_k, top_p).softmax(-1)
            token = sample_rows(probs, None, len(prompts), generator)
        logp = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        logps.append(torch.where(done, torch.zeros_like(logp), logp))
        alive = (~done).long()
        done = done | (token == eos_id)
        attention = torch.cat([attention, alive[:, None]], dim=1)
        step_ids, step_pos = token[:, None], (attention.sum(-1, keepdim=True) - 1).clamp(min=0)
        if bool(done.all()):
            break
    return torch.stack(tokens, 1), torch.stack(logps, 1)


@pytest.mark.parametrize(
    "temperature,top_k,top_p,greedy",
    [(1.0, 0, 1.0, False), (0.7, 0, 1.0, False), (1.0, 5, 0.9, False), (1.0, 0, 1.0, True)],
)
def test_optimised_decode_samples_the_plain_loops_tokens(model, tokenizer, prompts, temperature, top_k, top_p, greedy):
    """Same seed, same tokens, bit for bit (the demo's numbers depend on it), and the same log-probs within 1e-5;
    with EOS at varied steps, left padding, and past the preallocated cache's first fill."""
    from preflab.rollout import _generate_batch

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    hook = eos_boost(model, tokenizer, 3.0)
    try:
        for seed in range(4):
            batch = [prompts[i % 2][: len(prompts[i % 2]) - (i % 3)] for i in range(6)]
            args = (eos, pad, 12, temperature, top_k, top_p, greedy)
            want, want_logps = plain_decode(model, batch, *args, torch.Generator().manual_seed(seed))
            got, got_logps, finished = _generate_batch(model, batch, *args, torch.Generator().manual_seed(seed))
            assert [row[: len(c)] for row, c in zip(want.tolist(), got)] == got
            assert all(len(c) == want.shape[1] or c[-1] == eos for c in got)
            assert got_logps.shape == want_logps.shape
            torch.testing.assert_close(got_logps, want_logps, atol=1e-5, rtol=0)
    finally:
        hook.remove()


def test_preallocated_cache_gives_the_concatenated_caches_logits(model, tokenizer, prompts):
    """The decode loop's cache buffer hands attention views with the values (and logits) of HF's own cache."""
    from transformers import DynamicCache

    from preflab.rollout import _preallocate_cache

    batch = collate(prompts, [[]] * len(prompts), tokenizer.pad_token_id)
    P = int(batch["prompt_length"])
    ids, mask = batch["input_ids"][:, :P], batch["attention_mask"][:, :P]
    caches = [DynamicCache(config=model.config), DynamicCache(config=model.config)]
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        outs = [model(input_ids=ids, attention_mask=mask, use_cache=True, **{kw: c}) for c in caches]
        _preallocate_cache(caches[1], P + 4)
        assert type(caches[1].layers[0]).__name__ == "BufferedLayer"
        step = torch.tensor([[7], [8]])
        for t in range(6):  # 6 > 4: past the buffer it grows by concatenation
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            outs = [model(input_ids=step, attention_mask=mask, use_cache=True, **{kw: c}) for c in caches]
            assert torch.equal(outs[0].logits, outs[1].logits), t
            assert torch.equal(caches[0].layers[0].keys, caches[1].layers[0].keys)
