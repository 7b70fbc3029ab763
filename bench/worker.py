"""One measurement in its own process: one library, one method.

    python bench/worker.py --lib preflab --method dpo --assets WORK/assets.json --steps 2 6 --threads 2

runs the method once with the smaller step count as warm-up (untimed), then once with each step count, timing
each whole call (model loading, data preparation, the loop, saving), and prints one line
`BENCH_RESULT {json}` with the two wall times and the process's peak resident memory. The seconds per optimiser
step are measured two ways:
  * from the difference of run lengths, (t_long - t_short) / (long - short): everything a run does once cancels;
  * in process, from the long run: the time between the end of its first and of its last optimiser step over
    (long - 1), read from a global `torch.optim` step hook (both libraries use `torch.optim.AdamW`), so it holds
    everything between steps (rollouts, logging) and nothing of the run's start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself: rewards.py, the two sides


def step_seconds(step_ends: list, steps: int) -> float:
    """Seconds per optimiser step between the first and the last step's end (nan with one step or when the
    hook saw a number of optimiser steps that is not a multiple of `steps`)."""
    if steps < 2 or not step_ends or len(step_ends) % steps:
        return float("nan")
    per = len(step_ends) // steps  # optimiser.step calls per training step (1 for every method)
    ends = step_ends[per - 1 :: per]
    return (ends[-1] - ends[0]) / (steps - 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lib", choices=["preflab", "trl"], required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--assets", required=True, help="assets.json written by bench/assets.py")
    p.add_argument("--steps", type=int, nargs=2, required=True, metavar=("SHORT", "LONG"))
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args(argv)
    short, long = args.steps
    if not 1 <= short < long:
        p.error(f"--steps needs 1 <= SHORT < LONG, got {short} {long}")

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.set_num_threads(args.threads)
    assets = json.loads(Path(args.assets).read_text())
    if args.lib == "preflab":
        import preflab_side as side
    else:
        import trl_side as side

    step_ends: list[float] = []
    register_optimizer_step_post_hook(lambda *_: step_ends.append(time.perf_counter()))
    times, in_process = {}, float("nan")
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.lib}-{args.method}-") as tmp:
        for i, steps in enumerate([short, short, long]):  # the first is the warm-up
            out = os.path.join(tmp, f"run{i}")
            step_ends.clear()
            t0 = time.perf_counter()
            side.run(args.method, assets, steps, args.threads, out)
            times[i] = time.perf_counter() - t0
            in_process = step_seconds(step_ends, steps)
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    result = {
        "lib": args.lib,
        "method": args.method,
        "short": short,
        "long": long,
        "t_short": times[1],
        "t_long": times[2],
        "t_warmup": times[0],
        "in_process_seconds_per_step": in_process,
        "peak_rss_bytes": rss_kib * 1024,
        "threads": torch.get_num_threads(),
    }
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
