"""Best-of-n sampling against a reward, `preflab bon`: the non-training baseline every RL method must beat.

    1 sample n responses per prompt from the policy (the one rollout engine), plus one independent sample
    2 score all with the one reward interface (missing-EOS penalty included)
    3 keep the highest-scoring of the n; compare it with the independent sample (empirical win rate)
    4 report the analytic bounds and write the chosen responses to `responses.jsonl`

Analytic bounds for the best-of-n policy against the sampling policy (Stiennon et al. 2020 app. G;
Gao et al. 2022 eq. 1; Beirami et al. 2024 show the KL is an upper bound):
    KL(best-of-n || pi) <= log n - (n - 1) / n          win rate against pi <= n / (n + 1)
Nothing is trained, so there is no `model/` folder; the stage's run folder holds the responses and metrics.
With `--prompts world` the held-out (eval) split of the world's prompts is used: best-of-n is an evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from preflab.config import check, opt
from preflab.data import load_prompts, write_jsonl
from preflab.data.tokenize import encode_prompt
from preflab.policy.losses import best_of_n_indices
from preflab.policy.online import SamplingConfig, score_responses
from preflab.rollout import generate
from preflab.runs import Run, progress, seed_everything
from preflab.stages import stage
from preflab.training import autocast, make_accelerator, set_threads


@dataclass(kw_only=True)
class BoNConfig(SamplingConfig):
    prompts: str = opt("world", "a JSONL file of {'prompt': ...} rows, or 'world' (its held-out eval split)")
    n_prompts: int = opt(64, "prompts to use (world: drawn from the eval split; JSONL: the first rows)")
    n: int = opt(8, "samples per prompt; the best one is kept")
    batch_size: int = opt(64, "rows per generation batch")

    def __post_init__(self):
        super().__post_init__()
        check(self.n >= 1, f"n must be >= 1, got {self.n}")
        check(self.n_prompts >= 1, f"n_prompts must be >= 1, got {self.n_prompts}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


def kl_bound(n: int) -> float:
    """Upper bound on KL(best-of-n || pi) in nats: log n - (n - 1) / n (0 at n = 1)."""
    return math.log(n) - (n - 1) / n


def win_rate_bound(n: int) -> float:
    """Upper bound on the win rate of best-of-n against one sample of pi: n / (n + 1)."""
    return n / (n + 1)


@stage(BoNConfig)
def best_of_n(config: BoNConfig) -> dict:
    from preflab.models import load_model
    from preflab.reward import load_reward

    set_threads(config.threads)
    seed_everything(config.seed)
    if config.prompts == "world":
        from preflab.world import prompts as world_prompts

        prompts = world_prompts(config.n_prompts, seed=config.seed + 1, split="eval")
    else:
        prompts = load_prompts(config.prompts).rows[: config.n_prompts]
    reward_fn = load_reward(config.reward)
    policy, tokenizer = load_model(config.model)
    run = Run(config.out or None, "bon", config)
    device = make_accelerator(dtype=config.dtype).device
    policy.to(device)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    group = config.n + 1  # n candidates + 1 independent reference sample
    rows = [p for p in prompts for _ in range(group)]
    # 1-2. sample and score, in chunks of whole groups
    scores, texts, finished = [], [], []
    per_chunk = max(1, config.batch_size // group) * group
    for start in progress(range(0, len(rows), per_chunk), desc="bon"):
        chunk = rows[start : start + per_chunk]
        with autocast(config.dtype, device):
            rollout = generate(
                policy,
                tokenizer,
                [encode_prompt(tokenizer, p) for p in chunk],
                config.max_new_tokens,
                temperature=config.temperature,
                batch_size=config.batch_size,
                generator=gen,
            )
            scores.append(score_responses(reward_fn, chunk, rollout, config.missing_eos_penalty))
        texts += rollout.texts
        finished.append(rollout.finished)
    scores, finished = torch.cat(scores).view(-1, group), torch.cat(finished).view(-1, group)
    candidates, reference = scores[:, : config.n].reshape(-1), scores[:, config.n]
    # 3. the best of the n candidates; its win rate against the independent sample (ties count half)
    best = best_of_n_indices(candidates, config.n)
    best_scores = candidates[best]
    wins = (best_scores > reference).float() + 0.5 * (best_scores == reference).float()
    # 4. report and write the chosen responses
    chosen = []
    for i, prompt in enumerate(prompts):
        j = int(best[i]) - i * config.n
        chosen.append(
            {
                "prompt": prompt,
                "response": texts[i * group + j],
                "reward": best_scores[i].item(),
                "finished": bool(finished[i, j]),
                "mean_reward_of_n": candidates.view(-1, config.n)[i].mean().item(),
            }
        )
    write_jsonl(run.dir / "responses.jsonl", chosen)
    metrics = {
        "bon/reward/best": best_scores.mean(),
        "bon/reward/sample": reference.mean(),
        "bon/reward/gain": (best_scores - reference).mean(),
        "bon/win_rate": wins.mean(),
        "bon/win_rate_bound": win_rate_bound(config.n),
        "bon/kl_bound": kl_bound(config.n),
        "bon/eos_rate": finished[:, : config.n].float().mean(),
    }
    run.log(0, metrics)
    return run.finish(
        {
            "n": config.n,
            "prompts": len(prompts),
            "reward_best": best_scores.mean(),
            "reward_sample": reference.mean(),
            "win_rate": wins.mean(),
            "win_rate_bound": win_rate_bound(config.n),
            "kl_bound": kl_bound(config.n),
            "responses": str(run.dir / "responses.jsonl"),
        }
    )
