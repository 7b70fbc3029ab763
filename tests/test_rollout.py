"""The rollout engine: left padding is harmless, log-probs match `sequence_logps`, EOS stops a row, T divides logits."""

from __future__ import annotations

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


def test_processes_sampling_their_rows_draw_the_one_process_rollout(model, tokenizer, prompts):
    """Three 'processes' (threads, a barrier for the all-done vote), each sampling every third row, draw the
    tokens one process draws: chunks of 4 over 14 prompts (the last chunk leaves a process without rows) and rows
    ending at varied lengths (the chunk stops when every process's rows are done)."""
    import threading

    from preflab.rollout import sample_rows

    probs = torch.rand(5, 50).softmax(-1)
    one = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).squeeze(-1)
    assert sample_rows(probs[[1, 4]], [1, 4], 5, torch.Generator().manual_seed(3)).tolist() == one[[1, 4]].tolist()

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
