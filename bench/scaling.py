"""Scaling curves: seconds per optimiser step of preflab and TRL as the sequence length and the batch grow.

    .venv/bin/python bench/scaling.py                  # sft: length 128-2,048 at batch 4, batch 1-32 at length 256
    .venv/bin/python bench/scaling.py --methods sft,dpo # the same grids for DPO too (batch = pairs)
    .venv/bin/python bench/scaling.py --quick          # tiny model and grids: checks that it all runs

The measurement is bench/run.py's (its functions, imported): each (grid point, method, library) is a fresh
worker process (bench/worker.py) that warms up, then runs SHORT and LONG optimiser steps; seconds per step are
read in process from a torch.optim step hook; libraries alternate, their order flipping at every point. A
sequence is 1 BOS + prompt + completion tokens, the length split evenly between prompt and completion. The fp32
matmul speed is measured at the start and after every point, so a load change shows in the record. Writes
`scaling-<time>.md` and `.json` (every raw measurement) under --out and the two plots (log-log, seconds per step
against length and against batch) under --plots (default: beside the results, named after them).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import assets as assets_mod  # noqa: E402
import run as bench  # noqa: E402
from flops import matmul_gflops  # noqa: E402

LENGTHS, LENGTH_BATCH = [128, 256, 512, 1024, 2048], 4  # the length grid, at batch 4
BATCHES, BATCH_LENGTH = [1, 2, 4, 8, 16, 32], 256  # the batch grid, at length 256
QUICK_LENGTHS, QUICK_LENGTH_BATCH = [16, 32], 2
QUICK_BATCHES, QUICK_BATCH_LENGTH = [1, 2], 32
SCALING_METHODS = ["sft", "dpo"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, grids of two points each")
    p.add_argument("--libs", default="preflab,trl", help="comma-separated: preflab, trl (trl skipped if missing)")
    p.add_argument("--methods", default="sft", help=f"comma-separated subset of {','.join(SCALING_METHODS)}")
    p.add_argument("--steps", type=int, nargs=2, default=[1, 3], metavar=("SHORT", "LONG"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--points", default="", help="only these grid points, comma-separated BATCHxLENGTH (e.g. 4x2048,32x256)"
    )
    p.add_argument("--retries", type=int, default=2, help="times a point is measured again when the machine was busy")
    p.add_argument(
        "--quiet",
        type=float,
        default=0.8,
        help="busy: the matmul before or after a point below this share of the run's best (the point is redone)",
    )
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--plots", default="", help="folder for the two PNGs (bench-scaling-METHODS-length.png, -batch.png)")
    p.add_argument("--render", default="", metavar="FILE.json", help="only re-write FILE.md and the plots")
    p.add_argument(
        "--merge",
        nargs="*",
        default=[],
        metavar="MORE.json",
        help="with --render: add these runs' measurements to FILE.json (a point measured again replaces the old)",
    )
    p.add_argument("--work", default="", help="folder for models and data (default: OUT/work-scaling[-quick])")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(args.methods) - set(SCALING_METHODS) or not args.methods:
        p.error(f"--methods takes {SCALING_METHODS}, got {args.methods}")
    args.libs = [x.strip() for x in args.libs.split(",") if x.strip()]
    if set(args.libs) - {"preflab", "trl"} or not args.libs:
        p.error(f"--libs takes preflab and/or trl, got {args.libs}")
    args.batch = 0  # bench.sizes_for reads it: every point sets its own batch
    return args


def grid(quick: bool) -> list[dict]:
    """The points to measure, each once (the point both grids share is measured once and sits on both)."""
    lengths, lb, batches, bl = (
        (QUICK_LENGTHS, QUICK_LENGTH_BATCH, QUICK_BATCHES, QUICK_BATCH_LENGTH)
        if quick
        else (LENGTHS, LENGTH_BATCH, BATCHES, BATCH_LENGTH)
    )
    points = [(lb, n) for n in lengths] + [(b, bl) for b in batches]
    unique = list(dict.fromkeys(points))
    return [{"batch": b, "length": n, "on_length": b == lb, "on_batch": n == bl} for b, n in unique]


def point_sizes(args, batch: int, length: int) -> assets_mod.Sizes:
    base = assets_mod.QUICK if args.quick else assets_mod.Sizes()
    base = replace(base, batch=batch, prompt_len=length // 2, completion_len=length - length // 2)
    return bench.sizes_for(args, base)


def point_rows(results: list, points: list, methods: list, libs: list, params: int, peak: float) -> list:
    """bench/run.py's summary rows, one per (method, point) measured, with the point's batch and length."""
    rows = []
    for method in methods:
        for pt in points:
            rs = [r for r in results if (r["batch"], r["length"], r["method"]) == (pt["batch"], pt["length"], method)]
            if rs:
                rows += [{**pt, **row} for row in bench.summarise(rs, [method], libs, params, rs[0]["sizes"], peak)]
    return rows


def runs(meta: dict) -> list:
    """The runs a results file holds: its own, then those merged into it (`--merge`)."""
    keys = ["command", "started", "ended", "minutes"]
    return [{k: meta[k] for k in keys}, *meta.get("merged", [])]


def markdown(rows: list, meta: dict) -> str:
    libs = meta["libs"]
    lines = bench.table_head(["method", "batch", "length", "tokens/step"], libs)
    for row in rows:
        cells = [row["method"], str(row["batch"]), str(row["length"]), str(row["tokens_per_step"])]
        cells += bench.library_cells(row, libs)
        lines.append("| " + " | ".join(cells) + " |")
    m, z = meta, meta["sizes"]
    notes = [
        "Commands: "
        + "; ".join(f"`{r['command']}`, {r['started']} to {r['ended']} UTC ({r['minutes']:.1f} min)" for r in runs(m))
        + ".",
        f"Machine: {m['machine']}; torch threads {m['threads']}; fp32 matmul (1024x1024) "
        f"{', '.join(f'{g:.0f}' for g in m['matmul_gflops'])} GFLOP/s (at the start and after each point and attempt); "
        f"MFU against the fastest, {m['peak_gflops']:.1f}.",
        f"Versions: {m['versions']}.",
        f"Model: Llama, {m['params'] / 1e6:.2f}M parameters (hidden {z['hidden']}, {z['layers']} layers, vocabulary "
        f"{z['vocab']}), fp32. Length = prompt + completion tokens (split evenly; plus a BOS); batch = sequences "
        "(sft) or pairs (dpo) per optimiser step; tokens/step counts the BOS.",
        f"Seconds per step: in process, between the ends of the first and the last optimiser step of a "
        f"{m['steps'][1]}-step run, in a fresh process after a warm-up run; {m['repeats']} repetition(s). "
        f"Speed ratio = TRL s/step / preflab s/step; in brackets from whole-run lengths, "
        f"(t({m['steps'][1]} steps) - t({m['steps'][0]} steps)) / {m['steps'][1] - m['steps'][0]}.",
    ]
    if m.get("discarded"):
        redone = dict.fromkeys(f"{r['method']} batch {r['batch']} length {r['length']}" for r in m["discarded"])
        notes.append(
            f"Measured again: {', '.join(redone)} (a point is redone when the matmul before or after it falls below "
            f"{m.get('quiet', 0.8):.0%} of the run's best, or by hand, merged with `--merge`); the first measurements "
            "and why they were replaced are kept in the JSON (`discarded`)."
        )
    if m.get("skipped"):
        notes.append(m["skipped"])
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def plot(rows: list, meta: dict, folder: Path, prefix: str) -> list[Path]:
    """Two PNGs: seconds per step against length (the length grid) and against batch (the batch grid), log-log,
    one line per (library, method), a marker at each measured point; beside each, preflab's speed over TRL's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for axis, key, other, label in [
        ("length", "on_length", "batch", "sequence length (tokens)"),
        ("batch", "on_batch", "length", "batch (sequences or pairs)"),
    ]:
        on = [r for r in rows if r[key]]
        if not on:
            continue
        fig, (ax, rax) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
        for k, method in enumerate(dict.fromkeys(r["method"] for r in on)):  # a colour per method, a style per lib
            mine = sorted((r for r in on if r["method"] == method), key=lambda r: r[axis])
            for lib, style in [("preflab", "o-"), ("trl", "s--")]:
                pts = [(r[axis], r[lib]["seconds_per_step"]) for r in mine if lib in r]
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{k}", label=f"{lib} {method}")
            ratio = [(r[axis], r["speed_ratio"]) for r in mine if "speed_ratio" in r]
            if ratio:
                rax.plot(*zip(*ratio), "o-", color=f"C{k}", label=method)
        fixed = on[0][other]
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="seconds per optimiser step")
        ax.set_title(f"time per step against {axis} ({other} {fixed})", fontsize=10)
        ax.set_xticks(sorted({r[axis] for r in on}), [str(x) for x in sorted({r[axis] for r in on})])
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
        rax.axhline(1.0, color="grey", lw=0.8)
        rax.set(xscale="log", xlabel=label, ylabel="preflab speed / TRL (x)")
        rax.set_xticks(sorted({r[axis] for r in on}), [str(x) for x in sorted({r[axis] for r in on})])
        rax.minorticks_off()
        rax.set_ylim(bottom=0)
        rax.grid(True, alpha=0.3)
        if rax.get_legend_handles_labels()[0]:
            rax.legend(fontsize=8)
        fig.suptitle(f"preflab and TRL, fp32, {meta['threads']} torch thread(s) ({meta['params'] / 1e6:.1f}M Llama)")
        fig.tight_layout()
        path = folder / f"{prefix}-{axis}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(path: Path, results: list, points: list, gflops: list, meta: dict, args) -> str:
    meta = {**meta, "matmul_gflops": gflops, "peak_gflops": max(gflops), "repeats": args.repeats}
    rows = point_rows(results, points, args.methods, args.libs, meta["params"], meta["peak_gflops"])
    table = markdown(rows, meta)
    path.with_suffix(".md").write_text(table)
    report = {"meta": meta, "points": points, "rows": rows, "results": results}
    path.with_suffix(".json").write_text(json.dumps(report, indent=1))
    folder, prefix = (
        (Path(args.plots), f"bench-scaling-{'-'.join(args.methods)}") if args.plots else (path.parent, path.name)
    )
    plot(rows, meta, folder, prefix)
    return table


def merge(report: dict, other: dict, name: str) -> None:
    """Put `other`'s measurements into `report`: a (point, method, library) measured in both takes `other`'s
    (the re-measurement), the replaced one kept under `discarded`; new points and methods are added."""
    new = {(r["batch"], r["length"], r["method"], r["lib"]) for r in other["results"]}
    meta, om = report["meta"], other["meta"]
    keep = []
    for r in report["results"]:
        if (r["batch"], r["length"], r["method"], r["lib"]) in new:
            meta["discarded"].append({**r, "discarded": f"measured again in {name}"})
        else:
            keep.append(r)
    report["results"] = keep + other["results"]
    meta["discarded"] += om.get("discarded", [])
    seen = {(p["batch"], p["length"]) for p in report["points"]}
    report["points"] += [p for p in other["points"] if (p["batch"], p["length"]) not in seen]
    meta["methods"] = list(dict.fromkeys(meta["methods"] + om["methods"]))
    meta["matmul_gflops"] = meta["matmul_gflops"] + om["matmul_gflops"]
    meta["merged"] = [*meta.get("merged", []), *runs(om)]


def render(path: Path, args) -> str:
    report = json.loads(path.read_text())
    for other in args.merge:
        merge(report, json.loads(Path(other).read_text()), Path(other).name)
    meta = report["meta"]
    args.methods, args.libs, args.repeats = meta["methods"], meta["libs"], meta["repeats"]
    return write(path.with_suffix(""), report["results"], report["points"], meta["matmul_gflops"], meta, args)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render(Path(args.render), args), flush=True)
        return 0
    skipped = ""
    if "trl" in args.libs and not bench.trl_available():
        args.libs = [x for x in args.libs if x != "trl"]
        skipped = "TRL is not installed (`pip install -e '.[bench]'`): only preflab was measured."
        print(f"[scaling] {skipped}", flush=True)
        if not args.libs:
            return 2
    points = grid(args.quick)
    if args.points:
        wanted = {tuple(map(int, p.split("x"))) for p in args.points.split(",")}
        points = [pt for pt in points if (pt["batch"], pt["length"]) in wanted]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / ("work-scaling-quick" if args.quick else "work-scaling")
    t0 = time.time()
    name = f"scaling-{'quick-' if args.quick else ''}{time.strftime('%Y%m%d-%H%M%S', time.gmtime(t0))}"
    gflops = [matmul_gflops(args.threads)]
    print(f"[scaling] fp32 matmul {gflops[0]:.1f} GFLOP/s; {len(points)} points; {args.methods}; {args.libs}")
    meta = {
        "command": shlex.join(["python", "bench/scaling.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": bench.machine(),
        "threads": args.threads,
        "versions": bench.versions(),
        "steps": args.steps,
        "libs": args.libs,
        "methods": args.methods,
        "skipped": skipped,
        "quiet": args.quiet,
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t0)),
    }
    results, discarded = [], []
    with open(out / f"{name}.log", "w") as log:
        for rep in range(args.repeats):
            for i, pt in enumerate(points):
                folder = work / f"b{pt['batch']}-n{pt['length']}"
                built = assets_mod.build(folder, point_sizes(args, pt["batch"], pt["length"]))
                meta["params"], meta["sizes"] = built["params"], built["sizes"]
                order = args.libs if (rep + i) % 2 == 0 else args.libs[::-1]
                for attempt in range(args.retries + 1):
                    before, mine = gflops[-1], []
                    for method in args.methods:
                        for lib in order:
                            r = bench.measure(lib, method, folder / "assets.json", args, log)
                            r.update(repeat=rep, batch=pt["batch"], length=pt["length"], sizes=built["sizes"])
                            mine.append(r)
                            print(
                                f"[scaling] batch {pt['batch']:2d} length {pt['length']:4d} {lib:7s} {method:4s} "
                                f"{r['in_process_seconds_per_step']:.3f} s/step ({r['seconds_per_step']:.3f} from "
                                f"runs), peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB",
                                flush=True,
                            )
                    gflops.append(matmul_gflops(args.threads))
                    low = min(before, gflops[-1]) < args.quiet * max(gflops)
                    if not low or attempt == args.retries:
                        results += mine
                        break
                    why = f"matmul {before:.0f} and {gflops[-1]:.0f} GFLOP/s around it, best {max(gflops):.0f}"
                    print(f"[scaling] batch {pt['batch']} length {pt['length']}: {why}: measured again", flush=True)
                    discarded += [{**r, "discarded": why} for r in mine]
                meta["ended"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
                meta["minutes"] = (time.time() - t0) / 60
                meta["discarded"] = discarded
                table = write(out / name, results, points, gflops, meta, args)  # an interrupted run keeps its points
    print("\n" + table, flush=True)
    print(f"[scaling] wrote {out / name}.md and .json ({meta['minutes']:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
