"""Seconds per optimiser step and peak memory of SmolLM2-135M-Instruct in sft, reward, dpo and ppo, with and
without LoRA (issue 11), each in a fresh process, on the shared hh-rlhf pairs.

    .venv/bin/python bench/smollm2.py --out bench/results            # every stage, full and LoRA r=8
    .venv/bin/python bench/smollm2.py --stages sft --dtypes fp32 bf16 --lora 0   # bf16 beside fp32

Each measurement runs `preflab STAGE --model smollm2 ... --max-steps STEPS` in its own process through
`preflab.cli.main`; a global `torch.optim` step hook records the end of every optimiser step, and the figure is
the time from the end of the first step to the end of the last over (STEPS - 1): loading and de-quantising the
GGUF, tokenising and saving are outside it. Peak memory is the process's peak RSS (the whole process: Python,
torch, the model and, for dpo and ppo, the reference/critic). Shapes: 8 sequences (sft), 8 pairs (reward, dpo),
8 prompts x 1 sample x 32 new tokens (ppo, with its critic and reference), prompts cut to 64 tokens and
completions to 48. Writes `smollm2-<time>.md` and `.json` under --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flops import matmul_gflops  # bench/ itself: run as a script, its folder is on the path
from worker import step_seconds

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl"
STAGES = ("sft", "reward", "dpo", "ppo")


def stage_argv(stage: str, files: dict, lora: int, dtype: str, steps: int, threads: int, out: str) -> list[str]:
    common = ["--model", "smollm2", "--max-steps", str(steps), "--threads", str(threads), "--dtype", dtype]
    common += ["--lora-r", str(lora), "--out", out]
    lengths = ["--max-prompt-length", "64", "--max-completion-length", "48"]
    if stage == "sft":
        return ["sft", "--data", files["demos"], "--batch-size", "8", "--held-out", "0.1", *lengths, *common]
    if stage == "reward":
        extra = ["--batch-size", "8", "--max-eval-rows", "8", "--reference-rows", "8", "--eval-batch-size", "8"]
        return ["reward", "--data", files["pairs"], *extra, *lengths, *common]
    if stage == "dpo":
        extra = ["--batch-size", "8", "--micro-batch-size", "8", "--precompute-ref", "false", "--eval-every", "0"]
        return ["dpo", "--data", files["pairs_small"], "--held-out", "0.05", *extra, *lengths, *common]
    if stage == "ppo":
        extra = ["--reward", "rewards:digit_reward", "--prompts", files["prompts"], "--max-new-tokens", "32"]
        extra += ["--batch-size", "8", "--mini-batch-size", "8", "--micro-batch-size", "8", "--eval-prompts", "0"]
        return ["ppo", *extra, *common]
    raise ValueError(stage)


def child(argv: list[str]) -> None:
    """In the measuring process: run one stage, print `SMOLLM2_RESULT {json}`."""
    import resource

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from preflab.cli import main

    ends: list[float] = []
    register_optimizer_step_post_hook(lambda *_: ends.append(time.perf_counter()))
    t0 = time.perf_counter()
    rc = main(argv)
    wall = time.perf_counter() - t0
    per_step = step_seconds(ends, int(argv[argv.index("--max-steps") + 1]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(
        "SMOLLM2_RESULT "
        + json.dumps(
            {
                "rc": rc,
                "wall": wall,
                "step_s": per_step,
                "steps": len(ends),
                "rss_gib": rss,
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )


def write_inputs(directory: Path, n_pairs: int = 64) -> dict:
    """Demonstrations, pairs and prompts from the shared hh-rlhf file (read in place, small files written): the
    first `n_pairs` single-turn conversations (so PPO's prompts are short, like the others' cut ones)."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["prompt"].count("Human:") == 1 and len(r["prompt"]) < 300][:n_pairs]
    files = {
        "pairs": str(DATA),
        "pairs_small": str(directory / "pairs.jsonl"),
        "demos": str(directory / "demos.jsonl"),
        "prompts": str(directory / "prompts.jsonl"),
    }
    Path(files["pairs_small"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    demos = [{"prompt": r["prompt"], "completion": r["chosen_response"]} for r in rows]
    Path(files["demos"]).write_text("".join(json.dumps(d) + "\n" for d in demos))
    Path(files["prompts"]).write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    return files


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--lora", nargs="+", type=int, default=[0, 8], help="LoRA ranks to measure (0: full fine-tuning)")
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=3, help="optimiser steps per run (the first is not timed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child)
    if args.steps < 2:
        p.error(f"--steps must be >= 2 (the first step is not timed), got {args.steps}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFLAB_QUIET": "1", "PYTHONPATH": str(HERE)}
    results, gflops = [], [matmul_gflops(args.threads)]
    with tempfile.TemporaryDirectory(prefix="smollm2-bench-") as tmp:
        files = write_inputs(Path(tmp))
        for stage in args.stages:
            for lora in args.lora:
                for dtype in args.dtypes:
                    stage_args = stage_argv(stage, files, lora, dtype, args.steps, args.threads, f"{tmp}/{stage}")
                    cmd = [sys.executable, __file__, "--child", *stage_args]
                    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    line = next((x for x in done.stdout.splitlines() if x.startswith("SMOLLM2_RESULT ")), None)
                    if done.returncode or line is None:
                        print(done.stderr[-3000:], file=sys.stderr)
                        raise SystemExit(f"{stage} lora={lora} {dtype} failed (exit {done.returncode})")
                    row = {"stage": stage, "lora_r": lora, "dtype": dtype, **json.loads(line.split(" ", 1)[1])}
                    results.append(row)
                    print(
                        f"{stage:6} lora {lora:2} {dtype}: {row['step_s']:.2f} s/step, peak RSS "
                        f"{row['rss_gib']:.2f} GiB ({row['wall']:.0f} s in all)",
                        flush=True,
                    )
    gflops.append(matmul_gflops(args.threads))
    import torch

    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads; "
        f"fp32 1024x1024 matmul {gflops[0]:.0f} GFLOP/s before, {gflops[1]:.0f} after"
    )
    lines = [f"Machine: {machine}.", "", "| stage | LoRA r | dtype | s/step | peak RSS GiB |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['stage']} | {r['lora_r'] or 'full'} | {r['dtype']} | {r['step_s']:.2f} | {r['rss_gib']:.2f} |"
        for r in results
    ]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"smollm2-{stamp}.md").write_text("\n".join(lines) + "\n")
    (out / f"smollm2-{stamp}.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
