"""preflab's rollout engine (`preflab.rollout.generate`) beside transformers' `generate`, on the benchmark's model.

    .venv/bin/python bench/decode.py            # the online methods' rollout shape and two larger ones
    .venv/bin/python bench/decode.py --quick    # tiny model, checks that it runs

Both sample with temperature 1 and no top-k/top-p (transformers' `top_k=50` default set to 0) from the same
weights, in one process, alternating call by call (the order flipping every repetition), under the same thread
count, every row running to the full length: EOS is switched off on both sides (transformers'
`generation_config.eos_token_id = None`; preflab gets a tokenizer stand-in whose EOS id no token has), so both
produce exactly rows x new tokens. Median seconds per call over the repetitions, after one warm-up call each.
The fp32 matmul speed is measured before and after. Prints a markdown table; `--out` writes it and the raw
timings (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import assets as assets_mod  # noqa: E402
from flops import matmul_gflops  # noqa: E402

SHAPES = [(8, 32, 32), (32, 64, 64), (64, 128, 128)]  # (rows, prompt tokens, new tokens)
QUICK_SHAPES = [(2, 8, 8)]


class NoEos:
    """The tokenizer with an EOS id no token has, so every row runs to the end; preflab's engine also decodes the
    texts (transformers' `generate` returns ids only), and that time is counted."""

    def __init__(self, tokenizer):
        self.tokenizer, self.pad_token_id, self.eos_token_id = tokenizer, tokenizer.pad_token_id, -1

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="", help="folder for decode-<time>.md and .json")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from preflab.models import load_model
    from preflab.rollout import generate

    torch.set_num_threads(args.threads)
    sizes = assets_mod.QUICK if args.quick else assets_mod.Sizes()
    work = Path(args.out or HERE / "results") / ("work-quick" if args.quick else "work")  # run.py's assets
    built = assets_mod.build(work, sizes)
    ours, tokenizer = load_model(built["model"])
    theirs = AutoModelForCausalLM.from_pretrained(built["model"]).eval()
    theirs.generation_config.eos_token_id = None
    stand_in = NoEos(tokenizer)
    gflops = [matmul_gflops(args.threads)]
    rows_out = []
    shapes = QUICK_SHAPES if args.quick else SHAPES
    for rows, prompt_len, new in shapes:
        g = torch.Generator().manual_seed(0)
        prompts = [
            [tokenizer.bos_token_id] + torch.randint(3, 200, (prompt_len,), generator=g).tolist() for _ in range(rows)
        ]
        ids = torch.tensor(prompts)

        def run_ours():
            out = generate(ours, stand_in, prompts, max_new_tokens=new, batch_size=rows)
            assert out.batch["completion_mask"].sum() == rows * new
            return out

        def run_theirs():
            with torch.no_grad():
                out = theirs.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=new,
                    pad_token_id=tokenizer.pad_token_id,
                )
            assert out.shape == (rows, len(prompts[0]) + new)
            return out

        calls = {"preflab": run_ours, "transformers": run_theirs}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for fn in calls.values():
            fn()  # warm-up
        for r in range(args.repeats):
            order = list(calls) if r % 2 == 0 else list(calls)[::-1]
            for name in order:
                t0 = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(v) for name, v in times.items()}
        rows_out.append(
            {
                "rows": rows,
                "prompt": len(prompts[0]),
                "new": new,
                "seconds": times,
                "median": med,
                "speed_ratio": med["transformers"] / med["preflab"],
            }
        )
        print(
            f"[decode] {rows} x {new} new after {len(prompts[0])}: preflab {med['preflab']:.3f} s, "
            f"transformers {med['transformers']:.3f} s, preflab {med['transformers'] / med['preflab']:.2f}x",
            flush=True,
        )
    gflops.append(matmul_gflops(args.threads))
    lines = [
        "| rows x new tokens (prompt) | generated tokens | preflab s | preflab tokens/s | transformers s | "
        "transformers tokens/s | preflab speed / transformers |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows_out:
        n = r["rows"] * r["new"]
        lines.append(
            f"| {r['rows']} x {r['new']} ({r['prompt']}) | {n} | {r['median']['preflab']:.3f} | "
            f"{n / r['median']['preflab']:.0f} | {r['median']['transformers']:.3f} | "
            f"{n / r['median']['transformers']:.0f} | {r['speed_ratio']:.2f}x |"
        )
    import transformers

    lines += [
        "",
        f"- Command: `{' '.join(['python bench/decode.py'] + (sys.argv[1:] if argv is None else argv))}`",
        f"- {args.threads} torch threads; fp32 matmul {gflops[0]:.1f} GFLOP/s before, {gflops[1]:.1f} after; "
        f"median of {args.repeats} calls each, alternating; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; model {built['params'] / 1e6:.2f}M parameters.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"decode-{stamp}.md").write_text(table + "\n")
        (out / f"decode-{stamp}.json").write_text(json.dumps({"gflops": gflops, "rows": rows_out}, indent=1) + "\n")
        print(f"[decode] wrote {out / f'decode-{stamp}.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
