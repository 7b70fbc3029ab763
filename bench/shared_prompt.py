"""One change measured on its own: rows that share a prompt run it once (`preflab.logps.shared_prompt_forward`).

    .venv/bin/python bench/shared_prompt.py           # the benchmark's model and batch shapes
    .venv/bin/python bench/shared_prompt.py --quick   # tiny model, checks that it runs

In one process, on the benchmark's model (bench/assets.py), alternating call by call: the plain forward (every
row runs its own prompt) against the shared one, for
  * DPO's pair batch (8 pairs, 1 BOS + 64 prompt tokens, 64-token responses): `sequence_logps` with backward
    (the policy) and under `torch.inference_mode` (the reference);
  * the reward model on the same pairs, forward and backward;
  * an online group batch (2 prompts x 4 samples, 1 BOS + 32 prompt tokens, 32 new tokens): `sequence_logps`
    with backward (the policy update).
Median milliseconds per call after two warm-up calls; the ratio is plain / shared (above 1: sharing faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import assets as assets_mod  # noqa: E402
from flops import matmul_gflops  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from preflab.data.tokenize import TokenizedPair, collate, collate_pairs
    from preflab.logps import sequence_logps
    from preflab.models import load_model
    from preflab.reward.model import RewardModel

    torch.set_num_threads(args.threads)
    s = assets_mod.QUICK if args.quick else assets_mod.Sizes()
    work = HERE / "results" / ("work-quick" if args.quick else "work")  # run.py's assets (built again: the same)
    built = assets_mod.build(work, s)
    model, tokenizer = load_model(built["model"])
    model.train()
    reward_model = RewardModel(load_model(built["model"])[0], tokenizer, seed=0).train()
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 200, (n,), generator=g).tolist()

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pairs = collate_pairs(
        [
            TokenizedPair(
                [bos] + ids(s.prompt_len), ids(s.completion_len - 1) + [eos], ids(s.completion_len - 1) + [eos]
            )
            for _ in range(s.batch)
        ],
        tokenizer.pad_token_id,
    )
    prompts = [[bos] + ids(s.gen_prompt_len) for _ in range(s.gen_prompts)]
    group = collate(
        [p for p in prompts for _ in range(s.gen_k)],
        [ids(s.gen_tokens) for _ in range(s.gen_prompts * s.gen_k)],
        tokenizer.pad_token_id,
    )

    def policy_step(batch, share):
        sequence_logps(model, batch, share_prompt=share)[1].sum().backward()
        model.zero_grad(set_to_none=True)

    def reference(batch, share):
        with torch.inference_mode():
            sequence_logps(model, batch, share_prompt=share)

    def reward_step(batch, share):
        P = int(batch["prompt_length"]) if share else 0
        reward_model(batch["input_ids"], batch["attention_mask"], False, P).sum().backward()
        reward_model.zero_grad(set_to_none=True)

    cases = [
        ("DPO policy, forward + backward", policy_step, pairs),
        ("DPO reference, inference", reference, pairs),
        ("reward model, forward + backward", reward_step, pairs),
        ("online group, forward + backward", policy_step, group),
    ]
    gflops = [matmul_gflops(args.threads)]
    print(
        "| case | rows | distinct prompts | prompt / response tokens per row | plain ms | shared ms | plain / shared |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, fn, batch in cases:
        R, T = batch["input_ids"].shape
        P = int(batch["prompt_length"])
        distinct = len({tuple(row[:P]) for row in batch["input_ids"].tolist()})
        times = {False: [], True: []}
        for share in (False, True, False, True):
            fn(batch, share)
        for r in range(args.repeats):
            for share in (False, True) if r % 2 == 0 else (True, False):
                t0 = time.perf_counter()
                fn(batch, share)
                times[share].append(time.perf_counter() - t0)
        plain, shared = (statistics.median(times[k]) * 1e3 for k in (False, True))
        print(f"| {name} | {R} | {distinct} | {P} / {T - P} | {plain:.1f} | {shared:.1f} | {plain / shared:.2f}x |")
    gflops.append(matmul_gflops(args.threads))
    print(
        f"\n{args.threads} torch threads; fp32 matmul {gflops[0]:.1f} GFLOP/s before, {gflops[1]:.1f} after; median of "
        f"{args.repeats} calls each, alternating; model {built['params'] / 1e6:.2f}M parameters; command "
        f"`{' '.join(['python bench/shared_prompt.py'] + (sys.argv[1:] if argv is None else argv))}`"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
