"""preflab beside TRL, method by method, on one machine in one run.

    .venv/bin/python bench/run.py            # the full benchmark (make bench)
    .venv/bin/python bench/run.py --quick    # tiny sizes, few steps: checks that it all runs, numbers mean little

Both libraries train the same Llama (one config, one safetensors file), on the same data files, with the same
batch and thread count. Each (library, method) measurement is a fresh process (bench/worker.py) that runs the
method with SHORT steps as warm-up, then SHORT and LONG steps. Seconds per optimiser step, two ways: in process
(between the ends of the LONG run's first and last optimiser steps, from a torch.optim hook: the table's main
figure, used for tokens/s and MFU) and from the difference of the two run lengths, (t_long - t_short) /
(LONG - SHORT) (the ratio in brackets). Libraries alternate (their order flips every repetition); figures are
medians over repetitions. Peak memory is the worker's peak RSS. The fp32 matmul speed is measured at the start
and the end of the run with the same thread count; MFU is model FLOPs per second (bench/flops.py) over the
faster of the two. Writes a markdown table and the raw results (JSON) to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import assets as assets_mod  # noqa: E402
from flops import matmul_gflops, step_work  # noqa: E402

METHODS = ["reward", "sft", "dpo", "dpo_precomputed", "grpo", "rloo", "ppo"]
TRL_METHODS = {"reward", "sft", "dpo", "dpo_precomputed", "grpo", "rloo"}  # TRL has no PPO trainer here
LABELS = {
    "reward": "reward (Bradley-Terry)",
    "sft": "sft",
    "dpo": "DPO with a reference model",
    "dpo_precomputed": "DPO, reference log-probs precomputed",
    "grpo": "GRPO (beta 0)",
    "rloo": "RLOO (beta 0.05)",
    "ppo": "PPO (preflab) vs TRL GRPO, per generated token",
}
TRL_PARTNER = {"ppo": "grpo"}  # the TRL measurement a preflab row is set beside


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and data, steps 1 and 3, one repetition")
    p.add_argument(
        "--libs",
        default="preflab,trl",
        help="comma-separated: preflab, trl (trl is skipped, with a note, when it is not installed)",
    )
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument(
        "--steps",
        type=int,
        nargs=2,
        default=None,
        metavar=("SHORT", "LONG"),
        help="the two run lengths in optimiser steps (default 2 6; quick 1 3)",
    )
    p.add_argument("--repeats", type=int, default=None, help="repetitions (default 3; quick 1)")
    p.add_argument("--batch", type=int, default=0, help="sequences (sft) or pairs (reward, dpo) per step (default 8)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for both libraries and the matmul")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for the table (.md) and raw results (.json)")
    p.add_argument("--render", default="", metavar="FILE.json", help="only re-write FILE.md from a results file")
    p.add_argument("--work", default="", help="folder for model and data (default: OUT/work-quick or OUT/work)")
    args = p.parse_args(argv)
    args.steps = args.steps or ([1, 3] if args.quick else [2, 6])
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {METHODS}")
    args.libs = [x.strip() for x in args.libs.split(",") if x.strip()]
    if set(args.libs) - {"preflab", "trl"} or not args.libs:
        p.error(f"--libs takes preflab and/or trl, got {args.libs}")
    return args


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


def sizes_for(args, base: assets_mod.Sizes | None = None) -> assets_mod.Sizes:
    """The run's sizes (`base`, default the quick or full ones, with --batch) and enough data rows for them."""
    base = base or (assets_mod.QUICK if args.quick else assets_mod.Sizes())
    base = replace(base, batch=args.batch) if args.batch else base
    rows = max(base.rows, math.ceil(base.batch * (args.steps[1] + 2) / 0.9))  # a fresh batch each step, 5% held out
    return replace(base, rows=rows)


def measure(lib: str, method: str, assets_json: Path, args, log) -> dict:
    cmd = [
        sys.executable,
        str(HERE / "worker.py"),
        "--lib",
        lib,
        "--method",
        method,
        "--assets",
        str(assets_json),
        "--steps",
        *map(str, args.steps),
        "--threads",
        str(args.threads),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log.write(f"$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    lines = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{lib} {method} failed (exit {proc.returncode}):\n{tail}")
    r = json.loads(lines[-1][len("BENCH_RESULT ") :])
    r["seconds_per_step"] = (r["t_long"] - r["t_short"]) / (r["long"] - r["short"])
    return r


def summarise(results: list, methods: list, libs: list, params: int, sizes: dict, peak_gflops: float) -> list:
    """One row per method: medians over repetitions, tokens/s, MFU, memory and the ratio."""
    rows = []
    for method in methods:
        work = step_work(method, sizes, params)
        row = {
            "method": method,
            "label": LABELS[method],
            "tokens_per_step": work["tokens"],
            "token_kind": work["token_kind"],
        }
        for lib in libs:
            m = method if lib == "preflab" else TRL_PARTNER.get(method, method)
            if lib == "trl" and m not in TRL_METHODS:
                continue
            rs = [r for r in results if r["lib"] == lib and r["method"] == m]
            if not rs:
                continue
            sps = statistics.median(r["in_process_seconds_per_step"] for r in rs)
            flops = step_work(m, sizes, params)["flops"]
            row[lib] = {
                "seconds_per_step": sps,
                "all_seconds_per_step": [r["in_process_seconds_per_step"] for r in rs],
                "diff_seconds_per_step": statistics.median(r["seconds_per_step"] for r in rs),
                "all_diff_seconds_per_step": [r["seconds_per_step"] for r in rs],
                "tokens_per_second": work["tokens"] / sps if sps > 0 else float("nan"),
                "mfu": flops / sps / (peak_gflops * 1e9) if sps > 0 else float("nan"),
                "peak_rss_gib": max(r["peak_rss_bytes"] for r in rs) / 2**30,
            }
        if "preflab" in row and "trl" in row:
            row["speed_ratio"] = row["trl"]["seconds_per_step"] / row["preflab"]["seconds_per_step"]
            row["diff_speed_ratio"] = row["trl"]["diff_seconds_per_step"] / row["preflab"]["diff_seconds_per_step"]
        rows.append(row)
    return rows


def fmt(x: float, spec: str = ".3g") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def spread(median: float, values: list) -> str:
    """'median [min-max]' over repetitions (the median alone for one)."""
    if len(values) < 2:
        return fmt(median)
    return f"{fmt(median)} [{fmt(min(values))}-{fmt(max(values))}]"


def render(path: Path) -> str:
    """Recompute the rows of a results file from its raw measurements and re-write FILE.md; returns the table."""
    report = json.loads(path.read_text())
    meta = report["meta"]
    methods = [row["method"] for row in report["rows"]]
    rows = summarise(report["results"], methods, meta["libs"], meta["params"], meta["sizes"], meta["peak_gflops"])
    report["rows"] = rows
    path.write_text(json.dumps(report, indent=1))
    table = markdown(rows, meta["libs"], meta)
    path.with_suffix(".md").write_text(table)
    return table


def table_head(first: list[str], libs: list[str]) -> list[str]:
    """A results table's header lines: `first` columns, then library_cells' columns."""
    head = list(first)
    for lib in libs:
        head += [f"{lib} s/step", f"{lib} tokens/s", f"{lib} MFU", f"{lib} peak RSS GiB"]
    if len(libs) == 2:
        head.append("preflab speed / TRL (from run lengths)")
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def library_cells(row: dict, libs: list[str]) -> list[str]:
    """A table row's cells per library (s/step [spread], tokens/s, MFU, peak RSS) and, for two, the speed ratio."""
    cells = []
    for lib in libs:
        d = row.get(lib)
        cells += (
            [
                spread(d["seconds_per_step"], d["all_seconds_per_step"]),
                fmt(d["tokens_per_second"], ".4g"),
                fmt(100 * d["mfu"], ".1f") + "%",
                fmt(d["peak_rss_gib"], ".2f"),
            ]
            if d
            else ["-"] * 4
        )
    if len(libs) == 2:
        cells.append(
            f"{fmt(row['speed_ratio'], '.2f')}x ({fmt(row['diff_speed_ratio'], '.2f')}x)"
            if "speed_ratio" in row
            else "-"
        )
    return cells


def markdown(rows: list, libs: list, meta: dict) -> str:
    lines = table_head(["method", "tokens/step"], libs)
    for row in rows:
        cells = [row["label"], f"{row['tokens_per_step']} {row['token_kind']}", *library_cells(row, libs)]
        lines.append("| " + " | ".join(cells) + " |")
    m, z = meta, meta["sizes"]
    notes = [
        f"Command: `{m['command']}`",
        f"Machine: {m['machine']}; torch threads {m['threads']}; fp32 matmul (1024x1024) "
        f"{', '.join(f'{g:.1f}' for g in m['matmul_gflops'])} GFLOP/s (at the start and after each repetition); "
        f"MFU against the fastest, {m['peak_gflops']:.1f}.",
        f"Versions: {m['versions']}.",
        f"Model: Llama, {m['params'] / 1e6:.2f}M parameters (hidden {z['hidden']}, {z['layers']} layers, "
        f"vocabulary {z['vocab']}), fp32. Offline methods: batch {z['batch']}, prompt {z['prompt_len']} + "
        f"completion {z['completion_len']} tokens. Online: {z['gen_prompts']} prompts x {z['gen_k']} samples x "
        f"{z['gen_tokens']} new tokens after a {z['gen_prompt_len']}-token prompt, one optimiser step per rollout.",
        f"Seconds per step: in process, between the ends of the first and the last optimiser step of a "
        f"{m['steps'][1]}-step run (a torch.optim step hook), in a fresh process after a warm-up run; median "
        "[min-max] of "
        f"{m['repeats']} repetitions, libraries alternating. Speed ratio = TRL s/step / preflab s/step (above 1: "
        f"preflab faster); in brackets the same ratio from whole-run lengths, (t({m['steps'][1]} steps) - "
        f"t({m['steps'][0]} steps)) / {m['steps'][1] - m['steps'][0]}.",
        "MFU: model FLOPs per step (6 per parameter per trained token, 2 per forward-only token: generation, "
        "reference, rollout values; the LM head only where a distribution is read, never for the reward model; "
        "attention products not counted; bench/flops.py) / s per step / matmul peak.",
    ]
    if m.get("skipped"):
        notes.append(m["skipped"])
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.platform()})"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = [f"python {platform.python_version()}"]
    for name in ["torch", "transformers", "preflab", "trl"]:
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def write_report(path: Path, results, gflops, args, built, skipped, argv, done: int) -> str:
    peak = max(gflops)
    rows = summarise(results, args.methods, args.libs, built["params"], built["sizes"], peak)
    meta = {
        "command": shlex.join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "threads": args.threads,
        "matmul_gflops": gflops,
        "peak_gflops": peak,
        "versions": versions(),
        "params": built["params"],
        "sizes": built["sizes"],
        "steps": args.steps,
        "repeats": done,
        "repeats_asked": args.repeats,
        "libs": args.libs,
        "skipped": skipped,
        "utc": path.name.rsplit("-", 2)[-2] + "-" + path.name.rsplit("-", 1)[-1],
    }
    table = markdown(rows, args.libs, meta)
    path.with_suffix(".md").write_text(table)
    path.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "results": results}, indent=1))
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render(Path(args.render)), flush=True)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    skipped = ""
    if "trl" in args.libs and not trl_available():
        args.libs = [x for x in args.libs if x != "trl"]
        skipped = "TRL is not installed (`pip install -e '.[bench]'`): only preflab was measured."
        print(f"[bench] {skipped}", flush=True)
        if not args.libs:
            print("[bench] nothing to measure", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / ("work-quick" if args.quick else "work")
    sizes = sizes_for(args)
    built = assets_mod.build(work, sizes)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"bench-{'quick-' if args.quick else ''}{stamp}"
    start_gflops = matmul_gflops(args.threads)
    print(
        f"[bench] fp32 matmul {start_gflops:.1f} GFLOP/s with {args.threads} threads; model "
        f"{built['params'] / 1e6:.2f}M parameters; libs {args.libs}; methods {args.methods}",
        flush=True,
    )
    results, gflops = [], [start_gflops]
    with open(out / f"{name}.log", "w") as log:
        for rep in range(args.repeats):
            order = args.libs if rep % 2 == 0 else args.libs[::-1]
            for method in args.methods:
                for lib in order:
                    if lib == "trl" and method not in TRL_METHODS:
                        continue
                    r = measure(lib, method, work / "assets.json", args, log)
                    r["repeat"] = rep
                    results.append(r)
                    print(
                        f"[bench] rep {rep + 1}/{args.repeats} {lib:7s} {method:16s} "
                        f"{r['in_process_seconds_per_step']:.3f} s/step in process, {r['seconds_per_step']:.3f} "
                        f"from runs of {r['t_short']:.2f} / {r['t_long']:.2f} s, "
                        f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB",
                        flush=True,
                    )
            gflops.append(matmul_gflops(args.threads))
            print(f"[bench] fp32 matmul {gflops[-1]:.1f} GFLOP/s after repetition {rep + 1}", flush=True)
            # the table so far (complete repetitions only): an interrupted run still leaves its figures
            table = write_report(out / name, results, gflops, args, built, skipped, argv, rep + 1)
    print("\n" + table, flush=True)
    print(f"[bench] wrote {out / name}.md and .json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
