"""The machine's fp32 matmul speed, and the model FLOPs of one optimiser step of each method.

Model FLOPs count the work the algorithm needs, the same formula for both libraries (so MFU compares how much
of the machine each library turns into that work): 2 N FLOPs per token for a forward, 6 N for a forward and
backward, N the model's parameters (the tied embedding counted once, as the LM head's matmul); attention's
score and value products are not counted (small beside N at these lengths). A library that does more passes
than the algorithm needs (say, a separate forward for the old log-probs) gets no credit for them.
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


def step_work(method: str, s: dict) -> dict:
    """Tokens per optimiser step (what tokens/s counts) and model FLOPs per step, per parameter."""
    offline_seq = 1 + s["prompt_len"] + s["completion_len"]  # BOS + prompt + completion
    online_seq = 1 + s["gen_prompt_len"] + s["gen_tokens"]
    rows = s["gen_prompts"] * s["gen_k"]
    if method == "sft":
        tokens = s["batch"] * offline_seq
        return {"tokens": tokens, "token_kind": "train", "flops_per_param": 6 * tokens}
    if method == "reward":
        tokens = 2 * s["batch"] * offline_seq
        return {"tokens": tokens, "token_kind": "train", "flops_per_param": 6 * tokens}
    if method in ("dpo", "dpo_precomputed"):
        tokens = 2 * s["batch"] * offline_seq
        ref = 2 * tokens if method == "dpo" else 0  # precomputed: done once, outside the steps
        return {"tokens": tokens, "token_kind": "train", "flops_per_param": 6 * tokens + ref}
    if method in ("grpo", "rloo", "ppo"):
        generated = rows * s["gen_tokens"]
        seq_tokens = rows * online_seq
        flops = 2 * seq_tokens + 6 * seq_tokens  # generation (prefill + decode), policy update
        if method == "rloo":
            flops += 2 * seq_tokens  # reference log-probs (beta 0.05)
        if method == "ppo":
            flops += 2 * seq_tokens + 2 * seq_tokens + 6 * seq_tokens  # reference, rollout values, value update
        return {"tokens": generated, "token_kind": "generated", "flops_per_param": flops}
    raise ValueError(f"unknown method {method!r}")
