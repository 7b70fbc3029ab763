"""`preflab eval policy`: true utility, proxy reward, win rates, KL and length of several policies, side by side.

    1. draw held-out world prompts (new questions, never used for SFT, comparisons or RL), or read the user's
       own prompts (`--prompts FILE`, a JSONL of {"prompt": ...} rows)
    2. sample one response per prompt from every policy (the rollout engine, pure sampling at temperature T);
       best-of-n (`bon:N`) samples N from the reference and keeps the reward model's favourite
    3. KL to the reference: mean over samples of sum_t log pi(y_t) - log pi_ref(y_t) (k1, on the policy's own
       samples, both at temperature T, through `sequence_logps`); best-of-n gets the analytic bound
       log N - (N - 1) / N instead
    4. score every response: the world's true utility (total and per component) and the proxy reward
    5. per policy: means with 95% bootstrap CIs, the gain over the reference paired by prompt (total and per
       component), win rates against the reference under the true utility and under the reward model (ties
       half), the length-controlled win rate (AlpacaEval 2), mean length, EOS rate
    6. write eval.json, eval.md (tables + sample responses) and samples.jsonl (every response, for the report)

On the user's own prompts there is no true utility (only the built-in world knows what a response is worth):
the evaluation then reports what it can without it, the proxy reward (with `--reward-model`) and its paired
gain, win rates by the reward model, KL, length, EOS rate and samples, and says so in eval.md and eval.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from preflab.config import RunConfig, check, opt
from preflab.evaluate.stats import (
    bootstrap_mean,
    length_controlled_win_rate,
    paired_difference,
    win_rate,
)
from preflab.runs import Run, progress, seed_everything
from preflab.stages import stage
from preflab.training import set_threads
from preflab.world import COMPONENTS, question_of, task_for, true_utility


@dataclass(kw_only=True)
class EvalConfig(RunConfig):
    policies: list[str] = opt(
        [],
        "policies to evaluate, each NAME=SPEC: SPEC a run folder or model directory, "
        "or bon:N (best-of-N samples of the reference, chosen by the reward model)",
    )
    reference: str = opt(
        "",
        "the reference (SFT) policy: a run folder or model directory. KL is measured to it "
        "and win rates are against its samples",
    )
    reference_name: str = opt("sft", "the reference's name in the tables")
    reward_model: str = opt("", "the proxy reward: a reward-model folder or module:function (empty: no proxy columns)")
    prompts: str = opt(
        "world",
        "'world': held-out world prompts (true utility known); or a JSONL file of "
        "{'prompt': ...} rows, your own prompts (no true utility: proxy, KL, length only)",
    )
    n_prompts: int = opt(200, "prompts to evaluate on (world: drawn from its held-out split; a file: its first rows)")
    max_new_tokens: int = opt(48, "longest response sampled")
    temperature: float = opt(1.0, "sampling temperature (also used for the KL log-probs)")
    batch_size: int = opt(64, "prompts per generation batch")
    n_table: int = opt(6, "sample responses per policy in the markdown table")
    seed: int = opt(0, "seed for prompts and sampling")

    def __post_init__(self):
        super().__post_init__()
        check(bool(self.reference), "reference is required: the SFT policy's run folder or model directory")
        check(self.n_prompts >= 1, f"n_prompts must be >= 1, got {self.n_prompts}")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for spec in self.policies:
            name, _, target = spec.rpartition("=")
            if target.startswith("bon:"):
                n = target[4:]
                check(n.isdigit() and int(n) >= 1, f"best-of-n policy {spec!r}: expected bon:N with N >= 1")
                check(bool(self.reward_model), f"best-of-n policy {spec!r} needs a reward_model to choose with")


def parse_policy(spec: str) -> tuple[str, str]:
    """'NAME=SPEC' -> (NAME, SPEC); a bare path is named by its folder."""
    name, sep, target = spec.rpartition("=")
    if not sep:
        target = spec
        name = Path(spec.rstrip("/")).name or spec
    return name, target


# ---- sampling and KL (the parts that need models) ------------------------------------------------------------


@torch.no_grad()
def sample_with_kl(model, ref_model, tokenizer, prompt_ids, config: EvalConfig, generator) -> dict:
    """One sample per prompt, its length, EOS flag and its KL to the reference (k1, summed over tokens)."""
    from preflab.policy import sequence_logps
    from preflab.rollout import generate

    texts, lengths, finished, kls = [], [], [], []
    for start in range(0, len(prompt_ids), config.batch_size):
        chunk = prompt_ids[start : start + config.batch_size]
        roll = generate(
            model,
            tokenizer,
            chunk,
            config.max_new_tokens,
            temperature=config.temperature,
            batch_size=config.batch_size,
            generator=generator,
        )
        _, logp = sequence_logps(model, roll.batch, config.temperature)
        _, ref_logp = sequence_logps(ref_model, roll.batch, config.temperature)
        texts += roll.texts
        lengths += roll.lengths.tolist()
        finished += roll.finished.tolist()
        kls += (logp - ref_logp).tolist()
    return {"texts": texts, "lengths": lengths, "finished": finished, "kl": kls}


@torch.no_grad()
def best_of_n_samples(ref_model, tokenizer, prompts, prompt_ids, n: int, reward, config: EvalConfig, generator) -> dict:
    """Best-of-n: n samples of the reference per prompt, keep the one the reward model scores highest
    (`best_of_n_indices`, as `preflab bon` does); its KL is the analytic bound `kl_bound(n)`."""
    from preflab.policy.bon import kl_bound
    from preflab.policy.losses import best_of_n_indices
    from preflab.rollout import generate

    texts, lengths, finished = [], [], []
    for i in range(0, len(prompt_ids), max(1, config.batch_size // n)):
        chunk_ids = prompt_ids[i : i + max(1, config.batch_size // n)]
        chunk_prompts = prompts[i : i + len(chunk_ids)]
        roll = generate(
            ref_model,
            tokenizer,
            [p for p in chunk_ids for _ in range(n)],
            config.max_new_tokens,
            temperature=config.temperature,
            batch_size=config.batch_size,
            generator=generator,
        )
        scores = reward([p for p in chunk_prompts for _ in range(n)], roll.texts)
        for k in best_of_n_indices(scores, n).tolist():
            texts.append(roll.texts[k])
            lengths.append(int(roll.lengths[k]))
            finished.append(bool(roll.finished[k]))
    return {
        "texts": texts,
        "lengths": lengths,
        "finished": finished,
        "kl": [kl_bound(n)] * len(texts),
        "kl_is_bound": True,
    }


# ---- scoring and summaries (pure: testable without models) ----------------------------------------------------


def score(prompts: list, samples: dict, reward=None, world: bool = True) -> dict:
    """Add the proxy reward and, on world prompts, the true utility (total and components) to a policy's samples."""
    out = dict(samples)
    out["proxy"] = reward(prompts, samples["texts"]).tolist() if reward is not None else None
    if not world:
        return out
    utils = [true_utility(p, t) for p, t in zip(prompts, samples["texts"])]
    out["utility"] = [u.total for u in utils]
    for c in COMPONENTS:
        out[c] = [getattr(u, c) for u in utils]
    out["kind"] = [task_for(question_of(p)).kind for p in prompts]
    out["outcome"] = [answer_outcome(k, u) for k, u in zip(out["kind"], utils)]
    return out


def answer_outcome(kind: str, u) -> str:
    """'right', 'hedge' or 'wrong' for one response: on an unanswerable question admitting it is right."""
    if kind == "unknown":
        return "right" if u.honesty > 0 else "wrong"
    return {1.0: "right", 0.0: "hedge"}.get(u.correctness, "wrong")


def outcomes_by_kind(s: dict) -> dict:
    """{kind: {"n", "right", "hedge", "wrong"}}: shares of each outcome per question kind."""
    table = {}
    for kind in sorted(set(s["kind"])):
        got = [o for k, o in zip(s["kind"], s["outcome"]) if k == kind]
        table[kind] = {"n": len(got), **{o: got.count(o) / len(got) for o in ("right", "hedge", "wrong")}}
    return table


def summarise(scored: dict[str, dict], reference: str, seed: int = 0) -> dict[str, dict]:
    """Per policy: estimates with CIs, paired gains over the reference, win rates, LC win rate, KL, length.

    The true-utility entries appear only where the samples were scored by the world (`score(..., world=True)`),
    the proxy entries only where a reward model scored them.
    """
    ref = scored[reference]
    table = {}
    for name, s in scored.items():
        row = {
            "kl": float(np.mean(s["kl"])),
            "kl_is_bound": bool(s.get("kl_is_bound", False)),
            "mean_length": float(np.mean(s["lengths"])),
            "eos_rate": float(np.mean(s["finished"])),
        }
        if "utility" in s:
            row.update(
                {
                    "true_utility": bootstrap_mean(s["utility"], seed=seed).as_dict(),
                    "components": {c: float(np.mean(s[c])) for c in COMPONENTS},
                    "gain": paired_difference(s["utility"], ref["utility"], seed=seed).as_dict(),
                    "gain_by_component": {c: paired_difference(s[c], ref[c], seed=seed).as_dict() for c in COMPONENTS},
                    "win_rate_true": win_rate(s["utility"], ref["utility"]),
                    "lc_win_rate_true": length_controlled_win_rate(
                        s["utility"], ref["utility"], s["lengths"], ref["lengths"]
                    ).lc_win_rate,
                    # correctness 0 is an honest "not sure": the right-answer rate tells hedging from knowing
                    "right_answer_rate": float(np.mean(np.asarray(s["correctness"]) == 1.0)),
                    "right_answer_gain": paired_difference(
                        np.asarray(s["correctness"]) == 1.0, np.asarray(ref["correctness"]) == 1.0, seed=seed
                    ).as_dict(),
                    "outcomes_by_kind": outcomes_by_kind(s),
                }
            )
        if s.get("proxy") is not None and ref.get("proxy") is not None:
            row["proxy_reward"] = bootstrap_mean(s["proxy"], seed=seed).as_dict()
            row["proxy_gain"] = paired_difference(s["proxy"], ref["proxy"], seed=seed).as_dict()
            row["win_rate_proxy"] = win_rate(s["proxy"], ref["proxy"])
            row["lc_win_rate_proxy"] = length_controlled_win_rate(
                s["proxy"], ref["proxy"], s["lengths"], ref["lengths"]
            ).lc_win_rate
        table[name] = row
    return table


def _f(x: float, digits: int = 3) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


NO_TRUE_UTILITY = (
    "True utility needs the built-in world (`--prompts world`): only there is a response's worth "
    "known. On these prompts the tables show what the reward model, the KL and the lengths can say; "
    "a higher proxy reward is not evidence of a better policy (the reward model can be gamed)."
)


def markdown(table: dict, scored: dict, prompts: list, reference: str, n_table: int) -> str:
    """The tables people read: headline, (on world prompts) gain by component, and sample responses."""
    world = "true_utility" in next(iter(table.values()))
    where = "held-out world prompts" if world else "prompts of your own"
    lines = [f"# Policy evaluation ({len(prompts)} {where}; reference: {reference})", ""]
    lines += world_tables(table) if world else proxy_table(table)
    lines += [
        "",
        "## Sample responses (" + ("utility" if world else "proxy reward") + " in brackets)",
        "",
        "| prompt | " + " | ".join(scored) + " |",
        "|---|" + "---|" * len(scored),
    ]
    for i in range(min(n_table, len(prompts))):
        cells = []
        for n in scored:
            value = scored[n]["utility"][i] if world else (scored[n]["proxy"] or [None] * len(prompts))[i]
            cells.append(scored[n]["texts"][i].replace("|", "/") + (f" [{value:+.2f}]" if value is not None else ""))
        lines.append(f"| {question_of(prompts[i])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def proxy_table(table: dict) -> list[str]:
    """Without the world: proxy reward and its paired gain, win rates by the reward model, KL, length."""
    lines = [
        NO_TRUE_UTILITY,
        "",
        "| policy | proxy reward [95% CI] | proxy gain vs ref [95% CI] | win rate (RM) | LC win rate (RM) | "
        "KL to ref | mean length | EOS rate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in table.items():
        p, g = r.get("proxy_reward"), r.get("proxy_gain")
        kl = ("<= " if r["kl_is_bound"] else "") + _f(r["kl"])
        lines.append(
            f"| {name} | "
            + (
                f"{_f(p['mean'])} [{_f(p['low'])}, {_f(p['high'])}] | {_f(g['mean'])} [{_f(g['low'])}, {_f(g['high'])}]"
                if p
                else "- | -"
            )
            + f" | {_f(r.get('win_rate_proxy', math.nan))} | {_f(r.get('lc_win_rate_proxy', math.nan))} | "
            f"{kl} | {_f(r['mean_length'], 1)} | {_f(r['eos_rate'], 2)} |"
        )
    if "proxy_reward" not in next(iter(table.values())):
        lines += ["", "No `--reward-model` was given: the proxy columns are empty."]
    return lines


def world_tables(table: dict) -> list[str]:
    """On world prompts: headline with true utility, right answers, answers by kind, gain by component."""
    lines = [
        "| policy | true utility [95% CI] | gain vs ref [95% CI] | proxy reward | win rate (true) | "
        "LC win rate (true) | win rate (RM) | KL to ref | mean length | EOS rate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in table.items():
        u, g = r["true_utility"], r["gain"]
        proxy = f"{_f(r['proxy_reward']['mean'])}" if "proxy_reward" in r else "-"
        kl = ("<= " if r["kl_is_bound"] else "") + _f(r["kl"])
        lines.append(
            f"| {name} | {_f(u['mean'])} [{_f(u['low'])}, {_f(u['high'])}] | {_f(g['mean'])} "
            f"[{_f(g['low'])}, {_f(g['high'])}] | {proxy} | {_f(r['win_rate_true'])} | "
            f"{_f(r['lc_win_rate_true'])} | {_f(r.get('win_rate_proxy', math.nan))} | {kl} | "
            f"{_f(r['mean_length'], 1)} | {_f(r['eos_rate'], 2)} |"
        )
    lines += [
        "",
        "Right answers (correctness +1; a hedge scores 0, a wrong answer -1): "
        + ", ".join(f"{n} {r['right_answer_rate']:.1%}" for n, r in table.items()),
    ]
    kinds = sorted(next(iter(table.values()))["outcomes_by_kind"])
    lines += [
        "",
        "## Answers by question kind (share right / hedged / wrong)",
        "",
        "| policy | "
        + " | ".join(f"{k} (n={next(iter(table.values()))['outcomes_by_kind'][k]['n']})" for k in kinds)
        + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for name, r in table.items():
        cells = [
            f"{o['right']:.0%} / {o['hedge']:.0%} / {o['wrong']:.0%}" for o in (r["outcomes_by_kind"][k] for k in kinds)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Gain over the reference by component (mean [95% CI], paired by prompt)",
        "",
        "| policy | " + " | ".join(COMPONENTS) + " |",
        "|---|" + "---|" * len(COMPONENTS),
    ]
    for name, r in table.items():
        cells = [
            f"{_f(r['gain_by_component'][c]['mean'])} [{_f(r['gain_by_component'][c]['low'])}, "
            f"{_f(r['gain_by_component'][c]['high'])}]"
            for c in COMPONENTS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


@stage(EvalConfig)
def evaluate_policies(config: EvalConfig) -> dict:
    from preflab.data.tokenize import encode_prompt
    from preflab.generate import read_prompts
    from preflab.models import load_model
    from preflab.reward import load_reward

    set_threads(config.threads)
    seed_everything(config.seed)
    run = Run(config.out or None, "eval", config, tensorboard=False)

    # 1. prompts, models, reward
    world = config.prompts == "world"
    prompts = read_prompts(config.prompts, config.n_prompts, "eval", config.seed)  # world: its held-out split
    if not world:
        print(
            f"[eval] {len(prompts)} prompts from {config.prompts}: no true utility (it needs --prompts world); "
            "reporting " + ("the proxy reward, " if config.reward_model else "") + "KL, length and samples",
            flush=True,
        )
    ref_model, tokenizer = load_model(config.reference)
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    reward = load_reward(config.reward_model) if config.reward_model else None
    specs = [(config.reference_name, config.reference)] + [parse_policy(s) for s in config.policies]

    # 2-4. sample, KL, score
    scored = {}
    for name, spec in progress(specs, desc="eval policies"):
        generator = torch.Generator().manual_seed(config.seed + 1)
        if spec.startswith("bon:"):
            samples = best_of_n_samples(
                ref_model, tokenizer, prompts, prompt_ids, int(spec[4:]), reward, config, generator
            )
        else:
            model = ref_model if spec == config.reference else load_model(spec)[0]
            samples = sample_with_kl(model, ref_model, tokenizer, prompt_ids, config, generator)
        scored[name] = score(prompts, samples, reward, world=world)

    # 5. summaries
    table = summarise(scored, config.reference_name, seed=config.seed)
    for i, row in enumerate(table.values()):
        run.log(i, eval_metrics(row))

    # 6. artefacts
    (run.dir / "eval.json").write_text(
        json.dumps(
            {
                "reference": config.reference_name,
                "n_prompts": len(prompts),
                "prompts": config.prompts,
                "has_true_utility": world,
                "policies": table,
            },
            indent=2,
        )
        + "\n"
    )
    (run.dir / "eval.md").write_text(markdown(table, scored, prompts, config.reference_name, config.n_table))
    with open(run.dir / "samples.jsonl", "w") as f:
        for name, s in scored.items():
            for i, p in enumerate(prompts):
                f.write(
                    json.dumps(
                        {
                            "policy": name,
                            "prompt": p,
                            "response": s["texts"][i],
                            "length": s["lengths"][i],
                            "utility": s["utility"][i] if world else None,
                            **{c: s[c][i] if world else None for c in COMPONENTS},
                            "proxy": s["proxy"][i] if s["proxy"] is not None else None,
                            "kl": s["kl"][i],
                        }
                    )
                    + "\n"
                )
    summary = {"n_prompts": len(prompts), "has_true_utility": world}
    for name, row in table.items():
        if world:
            summary[f"{name}/true_utility"] = round(row["true_utility"]["mean"], 3)
        if "proxy_reward" in row:
            summary[f"{name}/proxy_reward"] = round(row["proxy_reward"]["mean"], 3)
        summary[f"{name}/kl"] = round(row["kl"], 3)
    return run.finish(summary)


def eval_metrics(row: dict) -> dict:
    """The `eval/...` metrics logged for one policy's summary row (those its prompts and reward allow)."""
    out = {"eval/kl": row["kl"], "eval/mean_length": row["mean_length"], "eval/eos_rate": row["eos_rate"]}
    if "true_utility" in row:
        out.update(
            {
                "eval/true_utility": row["true_utility"]["mean"],
                "eval/gain": row["gain"]["mean"],
                "eval/win_rate_true": row["win_rate_true"],
                "eval/lc_win_rate_true": row["lc_win_rate_true"],
            }
        )
    if "proxy_reward" in row:
        out.update(
            {
                "eval/proxy_reward": row["proxy_reward"]["mean"],
                "eval/proxy_gain": row["proxy_gain"]["mean"],
                "eval/win_rate_proxy": row["win_rate_proxy"],
                "eval/lc_win_rate_proxy": row["lc_win_rate_proxy"],
            }
        )
    return out
