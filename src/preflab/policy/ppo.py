"""PPO with a per-token KL penalty to a frozen reference: the InstructGPT recipe, `preflab ppo`.

    maximise  E_x E_{y ~ pi(.|x)} [ r(x, y) ] - beta KL(pi || pi_ref)

`ppo(config)` reads top to bottom, one rollout batch per step:
    1 rollout            sample one response per prompt with the one engine (`preflab.rollout.generate`)
    2 log-probs          recompute old and reference log-probs with `sequence_logps` (temperature on both)
    3 scores             the reward on decoded text, minus a penalty for rows that never reached EOS
    4 per-token reward   -beta KL_t (k1 or k3) + the score at the last real token
    5 reward whitening   optional, without mean shift
    6 values, GAE        V(s_t) from the value model; GAE(gamma, lambda); advantages whitened with mean shift
    7 update             several epochs over shuffled minibatches, micro-batches accumulated, one optimiser step
                         per minibatch; clipped policy loss + vf_coef x clipped value loss
    8 beta               the fixed or adaptive KL controller
    9 log                means over the whole step (never the last minibatch alone)
`docs/algorithms/ppo.md` maps each of the "N implementation details of RLHF with PPO" to the line doing it.

Value model (`value_init`): "policy" (default) copies the policy's backbone and puts a zero-initialised scalar
head on it, so V = 0 at step 0 and the first advantages are the plain whitened returns; it needs nothing but
the policy, so it works with any reward (a Python function has no backbone to copy). "reward" initialises
backbone and head from a trained reward model (Stiennon et al. 2020; InstructGPT), whose features already
describe the reward; it needs `--reward` (or `--value-model`) to be a reward-model folder.

The shared online pieces (`OnlineConfig`, prompts, scoring, chunked log-probs, held-out evaluation) live
here too; `rloo.py` and `bon.py` import them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from preflab.stages import stage
from preflab.config import check, opt
from preflab.data.tokenize import encode_prompt, position_ids
from preflab.policy.kl_control import make_kl_controller
from preflab.policy.logps import masked_mean, sequence_logps
from preflab.policy.losses import (KL_ESTIMATORS, approx_kl, clipped_policy_loss, clipped_value_loss,
                                   explained_variance, gae, masked_whiten, rlhf_rewards)
from preflab.rollout import generate
from preflab.runs import Run, progress, save_model, seed_everything
from preflab.training import Budget, make_accelerator, set_threads


@dataclass
class OnlineConfig:
    out: str = opt("", "run folder to write (default runs/<stage>-<time>)")
    model: str = opt("", "the policy to start from: a HF directory, a run folder, a .gguf file or 'smollm2'")
    reward: str = opt("", "a reward-model folder, a Python function 'module:function' f(prompt, response) -> float, or 'world'")
    prompts: str = opt("world", "a JSONL file of {'prompt': ...} rows, or 'world' for the tutoring world's prompts")
    n_prompts: int = opt(1000, "training prompts drawn from the world (prompts=world)")
    eval_prompts: int = opt(64, "held-out prompts scored before and after training (world: the eval split; JSONL: the last rows)")
    max_steps: int = opt(20, "rollout batches (steps) to train on")
    max_seconds: float = opt(0.0, "also stop after this many seconds (0: no time limit)")
    batch_size: int = opt(32, "prompts per rollout batch")
    mini_batch_size: int = opt(16, "rollout rows per optimiser step")
    micro_batch_size: int = opt(16, "rows per forward/backward (gradients accumulate over a minibatch)")
    epochs: int = opt(2, "passes over each rollout batch, reshuffled each time")
    lr: float = opt(1e-4, "learning rate (AdamW, constant)")
    beta: float = opt(0.05, "KL coefficient (initial value when adaptive)")
    kl_estimator: str = opt("k1", "per-token KL estimator to the reference: k1 (log-ratio) or k3 (low variance, >= 0)")
    target_kl: float = opt(0.0, "adaptive KL controller target, nats per sequence (0: beta stays fixed)")
    horizon: int = opt(10000, "adaptive KL controller horizon (Ziegler et al.: 10000)")
    cliprange: float = opt(0.2, "PPO ratio clip epsilon")
    temperature: float = opt(1.0, "sampling temperature (log-probs of policy and reference use it too)")
    max_new_tokens: int = opt(32, "longest response sampled")
    missing_eos_penalty: float = opt(1.0, "subtracted from the score of a response that never emitted EOS")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    log_every: int = opt(1, "log metrics every N steps")
    checkpoint_every: int = opt(0, "write the last-good checkpoint every N steps (0: only at the end)")
    seed: int = opt(0, "random seed")
    threads: int = opt(0, "torch intra-op threads (0: torch's default)")

    def __post_init__(self):
        check(bool(self.model), "give --model (a HF directory, a run folder, a .gguf file or 'smollm2')")
        check(bool(self.reward), "give --reward (a reward-model folder, 'module:function' or 'world')")
        check(self.max_steps > 0, f"max_steps must be > 0, got {self.max_steps}")
        for name in ("batch_size", "mini_batch_size", "micro_batch_size", "epochs", "max_new_tokens", "n_prompts"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.mini_batch_size % self.micro_batch_size == 0,
              f"mini_batch_size ({self.mini_batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})")
        check(self.kl_estimator in KL_ESTIMATORS, f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        check(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        check(self.target_kl >= 0, f"target_kl must be >= 0, got {self.target_kl}")
        check(self.horizon > 0, f"horizon must be > 0, got {self.horizon}")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(0 < self.cliprange < 1, f"cliprange must be in (0, 1), got {self.cliprange}")
        check(self.eval_prompts >= 0, f"eval_prompts must be >= 0, got {self.eval_prompts}")


@dataclass
class PPOConfig(OnlineConfig):
    value_init: str = opt("policy", "value model start: 'policy' (policy backbone + zero head) or 'reward' (the reward model)")
    value_model: str = opt("", "reward-model folder for value_init=reward (default: --reward)")
    vf_coef: float = opt(0.1, "weight of the value loss in the total loss")
    cliprange_value: float = opt(0.2, "value clip epsilon around the rollout-time values")
    gamma: float = opt(1.0, "discount (RLHF detail #13: 1)")
    lam: float = opt(0.95, "GAE lambda (RLHF detail #13: 0.95)")
    whiten_rewards: bool = opt(False, "whiten the per-token rewards of each rollout batch (without mean shift)")

    def __post_init__(self):
        super().__post_init__()
        check(self.batch_size % self.mini_batch_size == 0,
              f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        check(self.value_init in ("policy", "reward"), f"value_init must be 'policy' or 'reward', got {self.value_init!r}")
        check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        check(self.vf_coef >= 0, f"vf_coef must be >= 0, got {self.vf_coef}")


# ---- shared online pieces ----------------------------------------------------------------------------

def read_prompts(path: str) -> list:
    """Prompts from a JSONL file of {"prompt": str | [chat messages]} rows; errors name file:line."""
    from preflab.data import load_prompts

    return load_prompts(path).rows


def load_prompt_sets(spec: str, n_prompts: int, n_eval: int, seed: int) -> tuple[list, list]:
    """(training prompts, held-out prompts) as the data gives them (strings or chat messages)."""
    if spec == "world":
        from preflab.world import prompts

        return prompts(n_prompts, seed=seed, split="train"), prompts(n_eval, seed=seed + 1, split="eval")
    rows = read_prompts(spec)
    check(len(rows) > n_eval, f"{spec} has {len(rows)} prompts: too few to hold out eval_prompts={n_eval}")
    return (rows[:-n_eval], rows[-n_eval:]) if n_eval else (rows, [])


def score_responses(reward_fn, prompts: list, rollout, missing_eos_penalty: float) -> torch.Tensor:
    """The reward on (prompt as given, decoded response), minus the penalty where no EOS came (detail #4)."""
    scores = reward_fn(prompts, rollout.texts).float().cpu()
    return scores - missing_eos_penalty * (~rollout.finished).float()


def take(batch: dict, index) -> dict:
    """Rows `index` of a collate-layout batch (columns and prompt_length unchanged)."""
    return {k: (v if k == "prompt_length" else v[index]) for k, v in batch.items()}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def chunked_logps(model, batch: dict, temperature: float, chunk: int, entropy: bool = False):
    """Per-token log-probs [B, C] (and entropies) without gradients, `chunk` rows at a time."""
    parts, ents = [], []
    for start in range(0, batch["input_ids"].shape[0], chunk):
        out = sequence_logps(model, take(batch, slice(start, start + chunk)), temperature, return_entropy=entropy)
        parts.append(out[0])
        if entropy:
            ents.append(out[2])
    return (torch.cat(parts), torch.cat(ents)) if entropy else torch.cat(parts)


@torch.no_grad()
def rollout_and_score(policy, ref, tokenizer, reward_fn, prompts: list, config: OnlineConfig, device, step: int):
    """Steps 1-3 of every online loop (PPO, RLOO, GRPO): (rollout, batch on device, old log-probs, entropy,
    reference log-probs, scores). The old log-probs are recomputed by a full forward, not taken from sampling,
    so the first PPO ratio is exactly 1 (detail #17)."""
    generator = torch.Generator(device=device).manual_seed(config.seed * 100003 + step)
    rollout = generate(policy, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], config.max_new_tokens,
                       temperature=config.temperature, generator=generator)
    batch = to_device(rollout.batch, device)
    old_logps, entropy = chunked_logps(policy, batch, config.temperature, config.mini_batch_size, entropy=True)
    ref_logps = chunked_logps(ref, batch, config.temperature, config.mini_batch_size)
    scores = score_responses(reward_fn, prompts, rollout, config.missing_eos_penalty).to(device)
    return rollout, batch, old_logps, entropy, ref_logps, scores


def frozen_copy(model):
    """The reference: a copy of the initial policy, eval mode, no gradients."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def evaluate_policy(policy, ref, tokenizer, prompts: list, reward_fn, config: OnlineConfig, seed: int) -> dict:
    """Mean reward, KL(pi || ref) per sequence (k1, summed over tokens), length and EOS rate on held-out prompts."""
    if not prompts:
        return {}
    device = next(policy.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    rollout = generate(policy, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], config.max_new_tokens,
                       temperature=config.temperature, generator=gen)
    batch = to_device(rollout.batch, device)
    logp = chunked_logps(policy, batch, config.temperature, 64)
    ref_logp = chunked_logps(ref, batch, config.temperature, 64)
    scores = reward_fn(prompts, rollout.texts).float()
    return {"reward": scores.mean().item(), "kl": (logp - ref_logp).sum(-1).mean().item(),
            "length": rollout.lengths.float().mean().item(), "eos_rate": rollout.finished.float().mean().item()}


def prompt_cycle(prompts: list, batch_size: int, generator: torch.Generator):
    """Endless batches of prompts: every prompt once per pass, in a fresh random order each pass."""
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order += torch.randperm(len(prompts), generator=generator).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        yield [prompts[i] for i in chosen]


# ---- the value model ---------------------------------------------------------------------------------

class ValueModel(nn.Module):
    """V(s_t) for each completion token: a causal-LM backbone and a scalar head on the state before the token."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, batch: dict) -> torch.Tensor:
        P = int(batch["prompt_length"])
        C = batch["input_ids"].shape[1] - P
        mask = batch["attention_mask"]
        hidden = self.backbone(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids(mask),
                               use_cache=False).last_hidden_state
        values = self.head(hidden[:, P - 1:P + C - 1]).squeeze(-1)     # state before completion token t
        return values * batch["completion_mask"].to(values.dtype)


def make_value_model(policy, config: PPOConfig) -> ValueModel:
    if config.value_init == "reward":
        from preflab.models import ModelError

        path = config.value_model or config.reward
        try:
            from preflab.reward.model import RewardModel
        except ImportError as exc:
            raise ModelError(f"value_init=reward needs preflab.reward.model.RewardModel ({exc})") from None
        if not Path(path).is_dir():
            raise ModelError(f"value_init=reward needs a reward-model folder in --value-model or --reward, got {path!r}")
        rm = RewardModel.load(path)
        backbone = copy.deepcopy(rm.backbone)
        return ValueModel(backbone.get_decoder(), copy.deepcopy(rm.head)).float()
    head = nn.Linear(policy.config.hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return ValueModel(copy.deepcopy(policy.get_decoder()), head)


# ---- one PPO minibatch (pure enough to test) -------------------------------------------------------------

def ppo_minibatch(policy, value_model, mb: dict, config: PPOConfig, stats: dict | None = None) -> dict:
    """Forward/backward over the micro-batches of one minibatch; gradients summed, loss normalised by the
    minibatch's token count so that 4 micro-batches of 1 equal 1 micro-batch of 4. `mb` holds the batch plus
    old_logps, old_values, advantages, returns. Accumulates per-token sums into `stats`."""
    stats = stats if stats is not None else {}
    mask_all = mb["completion_mask"].float()
    n_tokens = mask_all.sum().clamp(min=1)
    B = mask_all.shape[0]
    for start in range(0, B, config.micro_batch_size):
        mu = take(mb, slice(start, start + config.micro_batch_size))
        mask = mu["completion_mask"].float()
        logp, _, entropy = sequence_logps(policy, mu, config.temperature, return_entropy=True)
        values = value_model(mu)
        pg, ratio, pg_clipped = clipped_policy_loss(logp, mu["old_logps"], mu["advantages"], config.cliprange)
        vf, vf_clipped = clipped_value_loss(values, mu["old_values"], mu["returns"], config.cliprange_value)
        loss = ((pg + config.vf_coef * vf) * mask).sum() / n_tokens
        loss.backward()
        with torch.no_grad():
            for name, value in (("loss/policy", pg), ("loss/value", vf), ("policy/clipfrac", pg_clipped.float()),
                                ("policy/approxkl", approx_kl(logp, mu["old_logps"])), ("val/ratio", ratio),
                                ("val/clipfrac", vf_clipped.float()), ("policy/entropy", entropy)):
                stats[name] = stats.get(name, 0.0) + (value * mask).sum().item()
            stats["tokens"] = stats.get("tokens", 0.0) + mask.sum().item()
            dev = ((ratio - 1).abs() * mask).max().item()
            stats["ratio_max_dev"] = max(stats.get("ratio_max_dev", 0.0), dev)
    return stats


# ---- the stage ---------------------------------------------------------------------------------------

def setup_online(config: OnlineConfig, stage_name: str):
    """(run, accelerator, policy, ref, tokenizer, reward_fn, train prompts, eval prompts)."""
    from preflab.models import load_model
    from preflab.reward import load_reward

    set_threads(config.threads)
    seed_everything(config.seed)
    train_prompts, eval_prompts = load_prompt_sets(config.prompts, config.n_prompts, config.eval_prompts, config.seed)
    reward_fn = load_reward(config.reward)
    policy, tokenizer = load_model(config.model)        # dropout off, pad != eos (details #1, #10)
    run = Run(config.out or None, stage_name, config)
    accelerator = make_accelerator()
    policy.to(accelerator.device)
    ref = frozen_copy(policy)
    return run, accelerator, policy, ref, tokenizer, reward_fn, train_prompts, eval_prompts


@stage(PPOConfig)
def ppo(config: PPOConfig) -> dict:
    run, accelerator, policy, ref, tokenizer, reward_fn, train_prompts, eval_prompts = setup_online(config, "ppo")
    device = accelerator.device
    value_model = make_value_model(policy, config).to(device)
    optimizer = torch.optim.AdamW([*policy.parameters(), *value_model.parameters()], lr=config.lr, eps=1e-5)
    kl_ctl = make_kl_controller(config.beta, config.target_kl, config.horizon)
    gen = torch.Generator().manual_seed(config.seed)
    batches = prompt_cycle(train_prompts, config.batch_size, gen)
    before = evaluate_policy(policy, ref, tokenizer, eval_prompts, reward_fn, config, config.seed + 7)
    budget = Budget(config.max_steps, config.max_seconds)
    bar = progress(total=config.max_steps, desc="ppo")
    step = 0
    while not budget.done(step):
        prompts = next(batches)
        # 1-3. rollout (pure sampling at temperature T, stop at EOS: details #3, #4); old and reference log-probs
        #      recomputed with the one log-prob function (temperature on both); scores with the missing-EOS penalty
        rollout, batch, old_logps, entropy, ref_logps, scores = rollout_and_score(
            policy, ref, tokenizer, reward_fn, prompts, config, device, step)
        mask = batch["completion_mask"].float()
        with torch.no_grad():
            # 4. per-token reward: -beta KL_t, score at the last real token (details #5, #11)
            rewards, kl = rlhf_rewards(old_logps, ref_logps, scores, mask, kl_ctl.value, config.kl_estimator)
            rlhf_reward = rewards.sum(-1)
            # 5. reward whitening without mean shift (detail #14)
            if config.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            # 6. values, GAE, advantage whitening with mean shift (details #13, #14)
            old_values = torch.cat([value_model(take(batch, slice(s, s + config.mini_batch_size)))
                                    for s in range(0, len(prompts), config.mini_batch_size)])
            advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
            advantages = masked_whiten(advantages, mask, shift_mean=True)
        data = {**batch, "old_logps": old_logps, "old_values": old_values, "advantages": advantages, "returns": returns}
        # 7. several epochs over reshuffled minibatches; one optimiser step per minibatch (detail #16)
        policy.train()
        value_model.train()
        stats: dict = {}
        first_dev = None
        for _epoch in range(config.epochs):
            order = torch.randperm(len(prompts), generator=gen).to(device)
            for start in range(0, len(prompts), config.mini_batch_size):
                optimizer.zero_grad(set_to_none=True)
                ppo_minibatch(policy, value_model, take(data, order[start:start + config.mini_batch_size]), config, stats)
                if first_dev is None:   # detail #17: ratio == 1 on the first minibatch of the first epoch
                    first_dev = stats["ratio_max_dev"]
                torch.nn.utils.clip_grad_norm_([*policy.parameters(), *value_model.parameters()], config.max_grad_norm)
                optimizer.step()
        policy.eval()
        value_model.eval()
        step += 1
        # 8. KL controller on the mean per-sequence KL of this batch (detail #12)
        mean_kl = kl.sum(-1).mean().item()
        beta_used = kl_ctl.value
        kl_ctl.update(mean_kl, len(prompts))
        # 9. log: means over the whole step
        n = max(stats["tokens"], 1.0)
        if step % config.log_every == 0 or step == config.max_steps:
            run.log(step, {
                "ppo/objective/kl": mean_kl, "ppo/objective/scores": scores.mean(),
                "ppo/objective/rlhf_reward": rlhf_reward.mean(), "ppo/objective/entropy": masked_mean(entropy, mask),
                "ppo/policy/approxkl": stats["policy/approxkl"] / n, "ppo/policy/clipfrac": stats["policy/clipfrac"] / n,
                "ppo/policy/first_ratio_dev": first_dev,
                "ppo/val/ratio": stats["val/ratio"] / n, "ppo/val/clipfrac": stats["val/clipfrac"] / n,
                "ppo/val/explained_variance": explained_variance(old_values, returns, mask),
                "ppo/loss/policy": stats["loss/policy"] / n, "ppo/loss/value": stats["loss/value"] / n,
                "ppo/beta": beta_used, "ppo/rollout/length": rollout.lengths.float().mean(),
                "ppo/rollout/eos_rate": rollout.finished.float().mean(),
            })
        bar.update(1)
        bar.set_postfix(score=f"{scores.mean().item():.3f}", kl=f"{mean_kl:.2f}")
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            run.save_checkpoint(policy, tokenizer, optimizer, step, extra={"beta": kl_ctl.value})
    bar.close()
    return finish_online(run, "ppo", policy, ref, tokenizer, reward_fn, eval_prompts, config, before, step, kl_ctl.value)


def finish_online(run, name, policy, ref, tokenizer, reward_fn, eval_prompts, config, before, step, beta) -> dict:
    """Held-out evaluation after training, the policy saved as a HF directory, the summary."""
    after = evaluate_policy(policy, ref, tokenizer, eval_prompts, reward_fn, config, config.seed + 7)
    if after:
        run.log(step, {f"{name}/eval/reward": after["reward"], f"{name}/eval/kl": after["kl"],
                       f"{name}/eval/length": after["length"], f"{name}/eval/eos_rate": after["eos_rate"]})
    save_model(policy, tokenizer, run.model_dir)
    summary = {"steps": step, "beta": beta, "model": str(run.model_dir)}
    summary.update({f"eval_{k}_before": v for k, v in before.items() if k != "kl"})
    summary.update({f"eval_{k}_after": v for k, v in after.items()})
    return run.finish(summary)
