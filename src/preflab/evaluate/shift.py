"""`preflab eval shift`: is the reward model still right away from the distribution its votes came from?

    1. held-out world prompts (split "eval", never used for SFT, votes or RL): `n_prompts` of the kinds the
       votes covered and, with `--left-out KIND`, `n_left_out` of that kind
    2. sample two responses per prompt from the reference (the SFT policy the votes were sampled from) and, with
       `--policy`, two per trained-kind prompt from the optimised policy (the rollout engine, temperature T)
    3. three sets of pairs, each judged by the world's true utility u:
         a. same distribution   SFT vs SFT on the trained kinds: the distribution the votes were drawn from
         b. optimised policy    policy vs policy and policy vs SFT on the trained kinds: what RL feeds it
         c. left-out kind       SFT vs SFT on prompts of the left-out kind, a task family it never saw
    4. score every response with every member: normalised member rewards r_k, the reward r (the ensemble's
       reduction; a single model is an ensemble of one) and the disagreement d = std_k r_k (population std)
    5. per set: pairwise accuracy mean(1[(r_a - r_b)(u_a - u_b) > 0]) over the pairs with u_a != u_b (a reward
       tie counts wrong, as in `preflab eval reward`), 95% bootstrap CI over pairs; with an ensemble, the alarm:
       the AUROC with which pair disagreement (d_a + d_b) / 2 ranks the reward model's errors above its right
       calls, and the same for the std of the members' margins std_k(r_k(a) - r_k(b)), with bootstrap CIs
    6. write shift.json (every number), shift.md (the table) and pairs.jsonl (one line per pair) in the run folder

The intervals resample pairs; set (b) has two pairs per prompt, so its interval is somewhat narrow.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from preflab.config import RunConfig, check, opt
from preflab.evaluate.stats import bootstrap_auroc, bootstrap_mean
from preflab.reward.model import REDUCTIONS, reduce_ensemble
from preflab.runs import Run, seed_everything
from preflab.stages import stage
from preflab.training import set_threads
from preflab.world import KINDS, kind_of, true_utility

SETS = {
    "same": "same distribution (SFT vs SFT)",
    "policy": "optimised policy (policy vs policy, policy vs SFT)",
    "left_out": "left-out kind (SFT vs SFT)",
}


@dataclass(kw_only=True)
class ShiftConfig(RunConfig):
    reward: str = opt("", "the reward model: a reward-model folder, an ensemble folder or a `preflab reward` run")
    reference: str = opt("", "the policy the training votes were sampled from (SFT): a run folder or model directory")
    policy: str = opt("", "an optimised policy (a PPO/DPO run folder or model directory); empty: no policy set")
    left_out: str = opt(
        "",
        "the question kind left out of the reward model's votes (capital, add or unknown; see "
        "`preflab reward --exclude-kind`); empty: no left-out set, every kind in the others",
    )
    n_prompts: int = opt(200, "held-out prompts of the trained kinds (the same-distribution and policy sets)")
    n_left_out: int = opt(200, "held-out prompts of the left-out kind")
    max_new_tokens: int = opt(48, "longest response sampled")
    temperature: float = opt(1.0, "sampling temperature")
    batch_size: int = opt(64, "prompts per generation batch")
    reduce: str = opt("", "ensemble reduction: mean, min or mean_minus_std (default: the ensemble's saved one)")
    n_boot: int = opt(2000, "bootstrap resamples for the intervals")

    def __post_init__(self):
        super().__post_init__()
        check(bool(self.reward), "give --reward (a reward-model or ensemble folder)")
        check(bool(self.reference), "give --reference (the SFT policy the votes were sampled from)")
        check(self.left_out in ("",) + KINDS, f"left_out must be one of {KINDS} or empty, got {self.left_out!r}")
        check(self.n_prompts >= 1, f"n_prompts must be >= 1, got {self.n_prompts}")
        check(self.n_left_out >= 1, f"n_left_out must be >= 1, got {self.n_left_out}")
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.reduce in ("",) + REDUCTIONS, f"reduce must be one of {REDUCTIONS}, got {self.reduce!r}")
        check(self.n_boot >= 1, f"n_boot must be >= 1, got {self.n_boot}")


# ---- steps 1-3: prompts, samples, pairs ----------------------------------------------------------------------


def shift_prompts(config: ShiftConfig) -> tuple[list, list]:
    """(prompts of the trained kinds, prompts of the left-out kind) from the world's held-out split."""
    from preflab.world import prompts

    trained = tuple(k for k in KINDS if k != config.left_out)
    same = prompts(config.n_prompts, seed=config.seed, split="eval", kinds=trained)
    if not config.left_out:
        return same, []
    return same, prompts(config.n_left_out, seed=config.seed + 1, split="eval", kinds=(config.left_out,))


@torch.no_grad()
def sample_texts(model, tokenizer, prompts: list, config: ShiftConfig, seed: int) -> list[str]:
    """One sample per prompt (repeat a prompt for more), pure sampling at the configured temperature."""
    from preflab.data.tokenize import encode_prompt
    from preflab.rollout import generate

    roll = generate(
        model,
        tokenizer,
        [encode_prompt(tokenizer, p) for p in prompts],
        config.max_new_tokens,
        temperature=config.temperature,
        batch_size=config.batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    return roll.texts


def build_pairs(n_same: int, n_left: int, has_policy: bool) -> tuple[list[tuple[str, int]], list[tuple]]:
    """The response layout and the pairs of step 3, as indices: (responses, pairs) with responses a list of
    (source, prompt index) and pairs a list of (set, i, j). Prompt indices below `n_same` are trained-kind
    prompts, the rest left-out ones; every prompt has samples 1 and 2 of its sources ("sft", "policy")."""
    responses: list[tuple[str, int]] = []
    at: dict[tuple[str, int, int], int] = {}

    def add(source: str, prompt: int, sample: int) -> None:
        at[(source, prompt, sample)] = len(responses)
        responses.append((source, prompt))

    for sample in (1, 2):
        for p in range(n_same + n_left):
            add("sft", p, sample)
        if has_policy:
            for p in range(n_same):
                add("policy", p, sample)
    pairs = [("same", at[("sft", p, 1)], at[("sft", p, 2)]) for p in range(n_same)]
    if has_policy:
        pairs += [("policy", at[("policy", p, 1)], at[("policy", p, 2)]) for p in range(n_same)]
        pairs += [("policy", at[("policy", p, 1)], at[("sft", p, 1)]) for p in range(n_same)]
    pairs += [("left_out", at[("sft", p, 1)], at[("sft", p, 2)]) for p in range(n_same, n_same + n_left)]
    return responses, pairs


# ---- steps 4-5: scores and statistics (pure: tests call them directly) ---------------------------------------


def member_scores(model, prompts: list, texts: list[str]) -> torch.Tensor:
    """[K, N] normalised rewards of every member (K = 1 for a single reward model)."""
    from preflab.reward.evaluate import members_of

    return torch.stack([m.reward(prompts, texts) for m in members_of(model)]).float().cpu()


def set_statistics(
    utility: np.ndarray, members: torch.Tensor, pairs: list[tuple], reduce: str, lam: float, n_boot: int, seed: int
) -> tuple[dict, list[dict]]:
    """Per set: accuracy against the true utility with a CI and, for K > 1, the disagreement alarm; and the
    per-pair values. `utility` [N] true utilities, `members` [K, N] normalised member rewards of the responses."""
    reward = reduce_ensemble(members, reduce, lam).numpy()
    spread = members.std(0, unbiased=False).numpy()  # per-response disagreement
    ensemble = members.shape[0] > 1
    per_pair, table = [], {}
    for name in SETS:
        rows = [(i, j) for s, i, j in pairs if s == name]
        if not rows:
            continue
        i, j = (np.array(x, dtype=int) for x in zip(*rows))
        du, dr = utility[i] - utility[j], reward[i] - reward[j]
        counted = du != 0
        correct = (dr * du > 0).astype(float)
        pair_spread = (spread[i] + spread[j]) / 2
        margin_spread = (members[:, i] - members[:, j]).std(0, unbiased=False).numpy()
        error = correct[counted] == 0
        entry = {
            "pairs": len(rows),
            "counted": int(counted.sum()),
            "equal_utility": int((~counted).sum()),
            "accuracy": bootstrap_mean(correct[counted], n_boot, seed=seed).as_dict(),
            "mean_true_utility": float(np.mean(np.concatenate([utility[i], utility[j]]))),
            "mean_disagreement": float(np.mean(np.concatenate([spread[i], spread[j]]))) if ensemble else None,
            "auroc": None,
            "auroc_margin": None,
        }
        if ensemble:
            entry["auroc"] = bootstrap_auroc(pair_spread[counted], error, n_boot, seed=seed).as_dict()
            entry["auroc_margin"] = bootstrap_auroc(margin_spread[counted], error, n_boot, seed=seed).as_dict()
        table[name] = entry
        for k, (a, b) in enumerate(rows):
            per_pair.append(
                {
                    "set": name,
                    "a": int(a),
                    "b": int(b),
                    "utility_a": float(utility[a]),
                    "utility_b": float(utility[b]),
                    "reward_a": float(reward[a]),
                    "reward_b": float(reward[b]),
                    "disagreement_a": float(spread[a]) if ensemble else None,
                    "disagreement_b": float(spread[b]) if ensemble else None,
                    "margin_std": float(margin_spread[k]) if ensemble else None,
                    "counted": bool(counted[k]),
                    "correct": bool(correct[k]),
                }
            )
    return table, per_pair


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(e: dict | None) -> str:
    return "n/a" if e is None else f"{_f(e['mean'])} [{_f(e['low'])}, {_f(e['high'])}]"


def markdown(table: dict, config: ShiftConfig, members: int) -> str:
    lines = [
        f"# Reward model under distribution shift ({config.reward}, {members} member(s))",
        "",
        "Pairwise accuracy against the world's true utility (pairs of equal true utility left out), 95% bootstrap "
        "intervals over pairs. Alarm: AUROC with which the members' disagreement ranks the reward model's wrong "
        "calls above its right ones (0.5: no warning; needs an ensemble).",
        "",
        "| set | pairs (counted / all) | accuracy [95% CI] | mean true utility | mean disagreement | "
        "AUROC, response std [95% CI] | AUROC, margin std [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in table.items():
        lines.append(
            f"| {SETS[name]} | {r['counted']} / {r['pairs']} | {_ci(r['accuracy'])} | {_f(r['mean_true_utility'])} | "
            f"{_f(r['mean_disagreement'])} | {_ci(r['auroc'])} | {_ci(r['auroc_margin'])} |"
        )
    lines += [
        "",
        f"Reference (SFT): {config.reference}; policy: {config.policy or '(none)'}; left-out kind: "
        f"{config.left_out or '(none)'}.",
    ]
    return "\n".join(lines) + "\n"


# ---- the stage -------------------------------------------------------------------------------------------------


@stage(ShiftConfig)
def evaluate_shift(config: ShiftConfig) -> dict:
    from preflab.models import load_model
    from preflab.reward.evaluate import members_of
    from preflab.reward.model import load_reward_model

    set_threads(config.threads)
    seed_everything(config.seed)
    run = Run(config.out or None, "eval-shift", config, tensorboard=False)
    # 1. prompts
    same, left = shift_prompts(config)
    prompts = same + left
    # 2. samples: two per prompt from the reference, two per trained-kind prompt from the policy
    responses, pairs = build_pairs(len(same), len(left), bool(config.policy))
    sft, tokenizer = load_model(config.reference)
    texts = {("sft", 1): sample_texts(sft, tokenizer, prompts, config, config.seed + 1)}
    texts[("sft", 2)] = sample_texts(sft, tokenizer, prompts, config, config.seed + 2)
    del sft
    if config.policy:
        policy, policy_tokenizer = load_model(config.policy)
        texts[("policy", 1)] = sample_texts(policy, policy_tokenizer, same, config, config.seed + 1)
        texts[("policy", 2)] = sample_texts(policy, policy_tokenizer, same, config, config.seed + 2)
        del policy
    # (responses are laid out sample 1 of every source, then sample 2: `build_pairs`)
    seen: dict[tuple[str, int], int] = {}
    response_texts, response_prompts = [], []
    for source, p in responses:
        sample = 1 + seen.get((source, p), 0)
        seen[(source, p)] = sample
        response_texts.append(texts[(source, sample)][p])
        response_prompts.append(prompts[p])
    # 3. the true utility of every response
    utility = np.array([true_utility(p, t).total for p, t in zip(response_prompts, response_texts)])
    # 4. every member's normalised reward
    model = load_reward_model(config.reward, reduce=config.reduce or None)
    members = member_scores(model, response_prompts, response_texts)
    reduce, lam = config.reduce or getattr(model, "reduce", "mean"), getattr(model, "lam", 1.0)
    # 5. per set
    table, per_pair = set_statistics(utility, members, pairs, reduce, lam, config.n_boot, config.seed)
    # 6. artefacts
    k = len(members_of(model))
    report = {"reward": config.reward, "members": k, "reduce": reduce if k > 1 else None, "sets": table}
    report.update(reference=config.reference, policy=config.policy, left_out=config.left_out)
    (run.dir / "shift.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(table, config, k)
    (run.dir / "shift.md").write_text(text)
    with open(run.dir / "pairs.jsonl", "w") as f:
        for row in per_pair:
            a, b = row["a"], row["b"]
            row.update(
                prompt=response_prompts[a],
                kind=kind_of(response_prompts[a]),
                source_a=responses[a][0],
                source_b=responses[b][0],
                response_a=response_texts[a],
                response_b=response_texts[b],
            )
            f.write(json.dumps(row) + "\n")
    print(text, flush=True)
    summary = {"members": k}
    for name, r in table.items():
        summary[f"{name}/accuracy"] = round(r["accuracy"]["mean"], 3) if r["counted"] else None
        summary[f"{name}/counted_pairs"] = r["counted"]
        if r["auroc"] is not None:
            summary[f"{name}/auroc"] = None if math.isnan(r["auroc"]["mean"]) else round(r["auroc"]["mean"], 3)
    return run.finish(summary)
