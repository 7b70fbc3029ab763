"""The machine's fp32 matmul speed, and the model FLOPs of one optimiser step of each method.

Model FLOPs count the work the algorithm needs, the same formula for both libraries (so MFU compares how much
of the machine each library turns into that work): 2 FLOPs per parameter per token for a forward, 6 for a
forward and backward; the LM head (the tied embedding) only on the tokens whose distribution is read;
attention's score and value products are not counted (small beside the matmuls at these lengths). A library
that does more passes than the algorithm needs (say, a separate forward for the old log-probs) gets no credit.
"""

from __future__ import annotations

import time


def matmul_gflops(threads: int, n: int = 1024, repeats: int = 10) -> float:
    """Best of `repeats` fp32 n x n matmuls with `threads` torch threads, in GFLOP/s."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def step_work(method: str, s: dict, params: int) -> dict:
    """Tokens per optimiser step (what tokens/s counts) and the model FLOPs of one step.

    The body (every parameter but the tied embedding / LM head, vocab x hidden) works on every token; the LM
    head only where the algorithm reads a distribution: completion tokens when training or scoring, each
    generated token when sampling, nowhere for the reward model (a scalar head on the last token).
    """
    head = s["vocab"] * s["hidden"]
    body = params - head
    offline_seq = 1 + s["prompt_len"] + s["completion_len"]  # BOS + prompt + completion
    online_seq = 1 + s["gen_prompt_len"] + s["gen_tokens"]
    rows = s["gen_prompts"] * s["gen_k"]

    def passes(sequences: int, seq_len: int, head_tokens: int, per_token: int) -> float:
        return per_token * (body * sequences * seq_len + head * sequences * head_tokens)

    if method == "sft":
        b = s["batch"]
        return {
            "tokens": b * offline_seq,
            "token_kind": "train",
            "flops": passes(b, offline_seq, s["completion_len"], 6),
        }
    if method == "reward":
        b = 2 * s["batch"]
        return {"tokens": b * offline_seq, "token_kind": "train", "flops": passes(b, offline_seq, 0, 6)}
    if method in ("dpo", "dpo_precomputed"):
        b = 2 * s["batch"]
        flops = passes(b, offline_seq, s["completion_len"], 6)
        if method == "dpo":  # the reference forward; precomputed: done once, outside the steps
            flops += passes(b, offline_seq, s["completion_len"], 2)
        return {"tokens": b * offline_seq, "token_kind": "train", "flops": flops}
    if method in ("grpo", "rloo", "ppo"):
        g = s["gen_tokens"]
        flops = passes(rows, online_seq, g, 2)  # generation: prefill + decode, the head on each new token
        flops += passes(rows, online_seq, g, 6)  # the policy update
        if method in ("rloo", "ppo"):
            flops += passes(rows, online_seq, g, 2)  # reference log-probs
        if method == "ppo":
            flops += passes(rows, online_seq, 0, 2) + passes(rows, online_seq, 0, 6)  # rollout values, value update
        return {"tokens": rows * g, "token_kind": "generated", "flops": flops}
    raise ValueError(f"unknown method {method!r}")
