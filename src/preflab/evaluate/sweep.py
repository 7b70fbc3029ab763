"""`preflab eval sweep`: reward over-optimisation, measured. True and proxy reward against sqrt(KL).

    1. for each arm (a KL coefficient with the proxy reward model, plus optional other rewards such as an
       ensemble, run at the smallest coefficient): one ordinary run of the online RL stage (`ppo`, `rloo` or
       `grpo`) from the reference policy to the longest training length, checkpointed at every length asked for
    2. evaluate the policy at each length on the same held-out prompts: KL to the reference (k1, on its own
       samples), true utility, proxy reward, mean length (`preflab.evaluate.policy`)
    3. per arm, fit Gao, Schulman and Hilton (2022)'s RL form R(d) = d (a - b log d) to the true-utility gain
       against d = sqrt(KL) (the reference is the point (0, 0)), and mark where the true reward peaks: the
       fitted d* and the best measured point
    4. write sweep.json and sweep.md; `preflab report` draws the figure

Reward hacking shows as an arm whose proxy gain keeps rising while the true-utility gain turns down.
The online stages use a constant learning rate and a step-indexed prompt order and sampling seed, so the
checkpoint at step N of a long run is the policy a run of N steps ends with: one run per arm gives every length.
Each point keeps its per-prompt true utilities and proxy rewards, so claims about the curve carry intervals.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from preflab.config import RunConfig, build_config, check, opt
from preflab.evaluate.policy import EvalConfig, outcomes_by_kind, sample_with_kl, score
from preflab.evaluate.stats import fit_rl
from preflab.runs import Run, seed_everything
from preflab.stages import stage
from preflab.training import set_threads


@dataclass(kw_only=True)
class SweepConfig(RunConfig):
    model: str = opt("", "the reference (SFT) policy every run starts from: a run folder or model directory")
    reward: str = opt("", "the proxy reward the policies are trained on: a reward-model folder or module:function")
    algorithm: str = opt("rloo", "the online RL stage to run: rloo or ppo")
    betas: list[float] = opt([0.0, 0.1], "KL coefficients to sweep")
    steps: list[int] = opt([10, 30], "training lengths (RL steps) to sweep")
    extra_rewards: list[str] = opt([], "more arms, LABEL=REWARD (e.g. an ensemble folder), run at the smallest beta")
    trained: list[str] = opt(
        [],
        "arms already trained, LABEL=RUN: a run of the same stage and options to the longest length, "
        "checkpointed at every length (e.g. the demo's PPO run); measured, not trained again",
    )
    rl_options: dict = opt(
        {}, "other options passed to the RL stage (YAML only), e.g. {batch_size: 16, lr: 1e-4}", cli=False
    )
    n_prompts: int = opt(200, "held-out prompts for each evaluation")
    max_new_tokens: int = opt(32, "longest response, in training and evaluation")
    batch_size: int = opt(64, "prompts per generation batch in each evaluation")
    seed: int = opt(0, "random seed")

    def __post_init__(self):
        super().__post_init__()
        check(bool(self.model), "give --model: the SFT policy every sweep run starts from")
        check(bool(self.reward), "give --reward: the proxy reward the sweep trains on")
        check(self.algorithm in ("rloo", "ppo", "grpo"), f"algorithm must be rloo, ppo or grpo, got {self.algorithm!r}")
        check(len(self.betas) >= 1 and all(b >= 0 for b in self.betas), f"betas must be >= 0, got {self.betas}")
        check(len(self.steps) >= 1 and all(s >= 1 for s in self.steps), f"steps must be >= 1, got {self.steps}")
        for spec in self.extra_rewards:
            check("=" in spec, f"extra_rewards entries are LABEL=REWARD, got {spec!r}")
        trained_runs(self)


def arms(config: SweepConfig) -> list[tuple[str, float, str]]:
    """(label, beta, reward spec) for every arm of the sweep."""
    out = [(f"beta={b:g}", float(b), config.reward) for b in config.betas]
    low = min(config.betas)
    out += [
        (f"{label} beta={low:g}", float(low), spec)
        for label, _, spec in (s.partition("=") for s in config.extra_rewards)
    ]
    return out


def trained_runs(config: SweepConfig) -> dict[str, str]:
    """{arm label: run folder} from `--trained LABEL=RUN` (labels hold '=' themselves: beta=0.2=runs/ppo)."""
    labels = [label for label, _, _ in arms(config)]
    out = {}
    for spec in config.trained:
        label = next((lb for lb in labels if spec.startswith(lb + "=") and len(spec) > len(lb) + 1), None)
        check(label is not None, f"trained entries are LABEL=RUN with LABEL one of {labels}, got {spec!r}")
        out[label] = spec[len(label) + 1 :]
    return out


def fit_arm(points: list[dict], base_true: float) -> dict:
    """Gao et al. RL-form fit of the true-utility gain against sqrt(KL), with the reference at (0, 0)."""
    d = np.array([0.0] + [p["sqrt_kl"] for p in points])
    gain = np.array([0.0] + [p["true_utility"] - base_true for p in points])
    fit = fit_rl(d, gain).as_dict()
    best = max(points, key=lambda p: p["true_utility"])
    fit["best_measured"] = {"sqrt_kl": best["sqrt_kl"], "true_utility": best["true_utility"], "steps": best["steps"]}
    fit["d_star"] = fit["d_star"] if math.isfinite(fit["d_star"]) else None
    fit["r_star"] = fit["r_star"] if math.isfinite(fit.get("r_star", math.nan)) else None
    return fit


def rl_options(config: SweepConfig, beta: float, reward: str, out: Path) -> dict:
    """The RL stage's options for one arm: to the longest length, checkpointed at every length."""
    lengths = sorted(config.steps)
    every = math.gcd(*lengths)
    return {
        "eval_prompts": 0,
        **config.rl_options,
        "model": config.model,
        "reward": reward,
        "beta": beta,
        "max_steps": lengths[-1],
        "max_new_tokens": config.max_new_tokens,
        "out": str(out),
        "seed": config.seed,
        "checkpoint_every": every,
        "keep_checkpoints": lengths[-1] // every,
    }


def checkpoints(config: SweepConfig, run_dir: Path) -> dict[int, Path]:
    """{steps: checkpoint folder} of an arm's run at every length asked for."""
    return {n: Path(run_dir) / "checkpoints" / f"step-{n:08d}" for n in sorted(config.steps)}


def rl_stage(algorithm: str):
    """The stage function of `algorithm` (ppo, rloo or grpo)."""
    from preflab.policy.ppo import ppo
    from preflab.policy.rloo import grpo, rloo

    return {"ppo": ppo, "rloo": rloo, "grpo": grpo}[algorithm]


def arm_folder(run_dir: Path, label: str) -> Path:
    """Where the sweep trains an arm's run: runs/<label> in its folder."""
    return Path(run_dir) / "runs" / label.replace(" ", "_")


def run_rl(config: SweepConfig, beta: float, reward: str, out: Path) -> dict[int, Path]:
    """One ordinary run of the RL stage to the longest length, checkpointed at every length; {steps: folder}."""
    fn = rl_stage(config.algorithm)
    fn(build_config(fn.config_class, rl_options(config, beta, reward, out), source="sweep"))
    return checkpoints(config, out)


def trained_arm(config: SweepConfig, label: str, folder: str) -> dict[int, Path]:
    """The checkpoints of an arm given as already trained (`--trained LABEL=RUN`), each checked to exist."""
    found = checkpoints(config, Path(folder))
    missing = [str(f) for f in found.values() if not f.is_dir()]
    check(
        not missing,
        f"--trained {label}={folder}: no checkpoint at {missing}; train it with checkpoint_every "
        f"{math.gcd(*config.steps)} to step {max(config.steps)}, or leave it out",
    )
    return found


def markdown(points: list[dict], fits: dict, base: dict) -> str:
    lines = [
        "# Over-optimisation sweep",
        "",
        f"Reference: true utility {base['true_utility']:.3f}, proxy {base['proxy']:.3f}, length {base['length']:.1f}.",
        "",
        "| arm | steps | KL | sqrt(KL) | true utility | proxy reward | right answers | mean length |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p['arm']} | {p['steps']} | {p['kl']:.3f} | {p['sqrt_kl']:.3f} | {p['true_utility']:.3f} | "
            f"{p['proxy']:.3f} | {p.get('right_answer_rate', float('nan')):.0%} | {p['length']:.1f} |"
        )
    lines += [
        "",
        "Fits of R(d) = d (a - b log d) to the true-utility gain (Gao et al. 2022):",
        "",
        "| arm | a | b | peak d* | fitted peak gain | best measured (steps, sqrt KL, true utility) |",
        "|---|---|---|---|---|---|",
    ]
    for arm, f in fits.items():
        b = f["best_measured"]
        peak = f"{f['d_star']:.3f}" if f["d_star"] is not None else "none"
        rstar = f"{f['r_star']:.3f}" if f["r_star"] is not None else "-"
        lines.append(
            f"| {arm} | {f['a']:.3f} | {f['b']:.3f} | {peak} | {rstar} | "
            f"{b['steps']}, {b['sqrt_kl']:.3f}, {b['true_utility']:.3f} |"
        )
    return "\n".join(lines) + "\n"


@stage(SweepConfig)
def sweep(config: SweepConfig) -> dict:
    from preflab.data.tokenize import encode_prompt
    from preflab.models import load_model
    from preflab.reward import load_reward
    from preflab.world import prompts as world_prompts

    set_threads(config.threads)
    seed_everything(config.seed)
    run = Run(config.out or None, "sweep", config, tensorboard=False)
    ref_model, tokenizer = load_model(config.model)
    prompts = world_prompts(config.n_prompts, seed=config.seed, split="eval")
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    proxy = load_reward(config.reward)
    ev = EvalConfig(
        reference=config.model,
        n_prompts=config.n_prompts,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
    )

    def measure(model) -> dict:
        s = score(
            prompts,
            sample_with_kl(model, ref_model, tokenizer, prompt_ids, ev, torch.Generator().manual_seed(config.seed + 1)),
            proxy,
        )
        kl = max(float(np.mean(s["kl"])), 0.0)  # the k1 estimate can dip below 0 by noise near the reference
        return {
            "kl": kl,
            "sqrt_kl": math.sqrt(kl),
            "true_utility": float(np.mean(s["utility"])),
            "proxy": float(np.mean(s["proxy"])),
            "length": float(np.mean(s["lengths"])),
            "right_answer_rate": float(np.mean(np.asarray(s["correctness"]) == 1.0)),
            "outcomes_by_kind": outcomes_by_kind(s),
            "utilities": [round(u, 6) for u in s["utility"]],
            "proxies": [round(float(x), 6) for x in s["proxy"]],
        }

    base = measure(ref_model)
    points = []
    i = 0
    given = trained_runs(config)
    for label, beta, reward in arms(config):
        print(
            f"[sweep] {label}: {max(config.steps)} {config.algorithm} steps, measured at {sorted(config.steps)}"
            + (f" (trained already: {given[label]})" if label in given else ""),
            flush=True,
        )
        if label in given:
            folders = trained_arm(config, label, given[label])
        else:
            folders = run_rl(config, beta, reward, arm_folder(run.dir, label))
        for steps, folder in folders.items():
            point = {
                "arm": label,
                "beta": beta,
                "reward": reward,
                "steps": steps,
                "run": str(folder),
                **measure(load_model(folder)[0]),
            }
            points.append(point)
            run.log(
                i, {"sweep/kl": point["kl"], "sweep/true_utility": point["true_utility"], "sweep/proxy": point["proxy"]}
            )
            i += 1
    fits = {
        label: fit_arm([p for p in points if p["arm"] == label], base["true_utility"]) for label, _, _ in arms(config)
    }
    (run.dir / "sweep.json").write_text(
        json.dumps({"reference": base, "points": points, "fits": fits}, indent=2) + "\n"
    )
    (run.dir / "sweep.md").write_text(markdown(points, fits, base))
    summary = {"points": len(points), "reference_true_utility": round(base["true_utility"], 3)}
    for label, f in fits.items():
        summary[f"{label}/best_true_utility"] = round(f["best_measured"]["true_utility"], 3)
    return run.finish(summary)
