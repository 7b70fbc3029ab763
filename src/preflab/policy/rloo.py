"""Critic-free policy optimisation: RLOO (`preflab rloo`) and GRPO (`preflab grpo`), one loop for both.

Each step samples k responses for each of `batch_size` prompts (prompt-major: rows i*k .. i*k+k-1 share a
prompt) with the one rollout engine, and scores them with the one reward interface. The methods differ in
three lines:

    RLOO (Ahmadian et al. 2024)   R_i = score_i - beta sum_t KL_t   (KL folded into the reward, as in PPO)
                                  A_i = R_i - mean of the other k-1 R_j          (leave-one-out baseline)
                                  loss_i = sum_t clip-loss_t                     (REINFORCE on the sequence)
    GRPO (Shao et al. 2024)       A_i = (score_i - mean_j score_j) / std_j score_j
                                  loss_i = mean_t clip-loss_t + beta mean_t k3_t (KL as a separate loss term)

Both use PPO's clipped ratio (Schulman et al. 2017, eq. 7) against the rollout-time log-probs; with one
epoch and one minibatch per batch the ratio is 1 and the update is plain REINFORCE with a baseline.
Departures: Ahmadian et al. give no clipping (it only acts with epochs > 1 or several minibatches); the
sequence loss is averaged over the sequences of a minibatch (not over tokens) so that micro-batch
accumulation is exact.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from preflab.config import check, opt
from preflab.logps import masked_mean, sequence_logps
from preflab.policy.losses import approx_kl, clipped_policy_loss, grpo_advantages, kl_estimate, kl_k3, rloo_advantages
from preflab.policy.online import (
    OnlineConfig,
    add_token_stats,
    check_scores,
    finish_online,
    micro_batches,
    needs_reference,
    optimise,
    rollout_and_score,
    save_loop,
    setup_online,
    single_pass,
    start_loop,
)
from preflab.runs import progress
from preflab.stages import stage
from preflab.training import autocast, sync_on_last


@dataclass(kw_only=True)
class RLOOConfig(OnlineConfig):
    k: int = opt(4, "samples per prompt (the group); rollout rows per step = batch_size x k")
    batch_size: int = opt(
        8,
        "prompts per rollout batch (8 x k=4 = 32 rows: with mini_batch_size 16 and 2 epochs, "
        "4 optimiser steps per batch, as PPO's defaults)",
    )

    def __post_init__(self):
        super().__post_init__()
        check(self.k >= 2, f"k must be >= 2 (a leave-one-out or group baseline needs 2 samples), got {self.k}")
        rows = self.batch_size * self.k
        check(
            rows % self.mini_batch_size == 0,
            f"batch_size x k ({rows}) must be a multiple of mini_batch_size ({self.mini_batch_size})",
        )


@dataclass(kw_only=True)
class GRPOConfig(RLOOConfig):
    beta: float = opt(0.04, "weight of the k3 KL loss term (Shao et al.: 0.04)")
    kl_estimator: str = opt("k3", "KL estimator for the logged KL; the loss term is always k3 (GRPO eq. 4)")


def rollout_kl(old_logps, ref_logps, mask, estimator: str) -> torch.Tensor:
    """sum_t KL_t per sequence [B] (0 without a reference: nothing reads it then)."""
    if ref_logps is None:
        return torch.zeros(old_logps.shape[0], device=old_logps.device)
    return (kl_estimate(old_logps, ref_logps, estimator) * mask).sum(-1)


def advantages_of(scores, kl, k: int, method: str, beta: float) -> torch.Tensor:
    """Leave-one-out on the KL-penalised reward (RLOO), or group-normalised scores (GRPO); rows prompt-major."""
    if method == "rloo":
        return rloo_advantages(scores - beta * kl, k)
    return grpo_advantages(scores, k)


def critic_free_minibatch(
    policy,
    mb: dict,
    config: RLOOConfig,
    method: str,
    beta: float,
    stats: dict | None = None,
    whole: dict | None = None,
    ddp=None,
    step: int = 0,
) -> dict:
    """Forward/backward over the micro-batches of one minibatch; the loss is the mean over its sequences, so
    accumulation over micro-batches is exact. `mb` holds the batch plus old_logps, ref_logps, advantages [B].
    With several processes `mb` is this process's share of the minibatch `whole` (the mean is over `whole`),
    `ddp` the accelerator: the loss is scaled by the world size (DDP averages gradients), which are all-reduced
    on the last micro-batch.

    Single-pass (`online.single_pass`, one process only: `mb` is the whole rollout in one micro-batch, with `row`
    (each row's index in the rollout) and `scores` instead of old_logps and advantages): the forward's own
    log-probs, detached, are the old log-probs; the KL and the advantages are computed from them, in rollout
    order, before the loss; `stats['rollout']` returns the KL [B] and entropy [B, C] in rollout order for the
    step's log."""
    stats = stats if stats is not None else {}
    n_rows = (mb if whole is None else whole)["input_ids"].shape[0]
    chunks = list(micro_batches(mb, config.micro_batch_size))
    for i, mu in enumerate(chunks):
        mask = mu["completion_mask"].float()
        length = mask.sum(-1).clamp(min=1)
        with sync_on_last(ddp, policy, i, len(chunks)) if ddp else contextlib.nullcontext():
            with autocast(config.dtype, mask.device):  # --dtype: the forward only, the backward outside
                logp, _, entropy = sequence_logps(policy, mu, config.temperature, return_entropy=True)
            ref_logps = mu.get("ref_logps")
            if "old_logps" in mu:
                old_logps, advantages = mu["old_logps"], mu["advantages"]
            else:
                assert ddp is None and mu["input_ids"].shape[0] == n_rows, "single pass: one process, one micro-batch"
                old_logps = logp.detach()
                kl = rollout_kl(old_logps, ref_logps, mask, config.kl_estimator)
                row = mu["row"]
                in_order = torch.empty_like(kl)
                in_order[row] = kl
                scores = torch.empty_like(mu["scores"])
                scores[row] = mu["scores"]
                check_scores(step, scores, in_order, config)  # before the update, as in the plain loop
                advantages = advantages_of(scores, in_order, config.k, method, beta)[row]
                ent = torch.empty_like(entropy)
                ent[row] = entropy
                stats["rollout"] = {"kl": in_order, "entropy": ent}
            adv = advantages[:, None].expand_as(logp)
            pg, ratio, clipped = clipped_policy_loss(logp, old_logps, adv, config.cliprange)
            if method == "rloo":
                per_seq = (pg * mask).sum(-1)  # REINFORCE on the whole sequence
                kl_term = torch.zeros_like(per_seq)
            else:
                per_seq = (pg * mask).sum(-1) / length  # GRPO eq. 3: 1/|o_i| sum_t
                kl_term = torch.zeros_like(per_seq)
                if beta:
                    kl_term = beta * (kl_k3(logp, ref_logps) * mask).sum(-1) / length  # GRPO eq. 3-4
            loss = (per_seq + kl_term).sum() / n_rows
            (loss * ddp.num_processes if ddp else loss).backward()
        with torch.no_grad():
            stats["loss/policy"] = stats.get("loss/policy", 0.0) + per_seq.sum().item()
            stats["loss/kl"] = stats.get("loss/kl", 0.0) + kl_term.sum().item()
            stats["rows"] = stats.get("rows", 0.0) + mu["input_ids"].shape[0]
            add_token_stats(
                stats,
                {
                    "policy/clipfrac": clipped.float(),
                    "val/ratio": ratio,
                    "policy/approxkl": approx_kl(logp, old_logps),
                },
                mask,
            )
    return stats


def critic_free(config: RLOOConfig, method: str) -> dict:
    s = setup_online(config, method)
    optimizer = torch.optim.AdamW(s.policy.parameters(), lr=config.lr, eps=1e-5, weight_decay=config.weight_decay)
    loop = start_loop(s, config, optimizer)
    policy_ddp = s.for_training(s.policy)  # DDP-wrapped with several processes (torchrun / accelerate launch)
    bar = progress(total=config.max_steps, initial=loop.step, desc=method)
    k = config.k
    with s.run.guarded() as stop:
        while not loop.budget.done(loop.step):
            prompts = [p for p in next(loop.prompts) for _ in range(k)]  # prompt-major groups of k
            one_pass = single_pass(config, len(prompts), s.processes)
            # 1-3. rollout, old and reference log-probs (temperature on both), scores with the missing-EOS penalty;
            #      single pass: the old log-probs come from the update's forward; beta 0: no reference
            r = rollout_and_score(
                s, prompts, config, loop.step, old_logps=not one_pass, reference=needs_reference(config)
            )
            mask = r.mask
            beta_used = loop.kl_ctl.value
            if one_pass:
                data = {**r.batch, "scores": r.scores, "row": torch.arange(len(prompts), device=s.device)}
                if r.ref_logps is not None:
                    data["ref_logps"] = r.ref_logps
            else:
                with torch.no_grad():
                    kl = rollout_kl(r.old_logps, r.ref_logps, mask, config.kl_estimator)
                    check_scores(loop.step + 1, r.scores, kl, config)  # NaN, a broken reward, KL past max_kl
                    # 4. advantages: leave-one-out on the KL-penalised reward, or group-normalised scores
                    advantages = advantages_of(r.scores, kl, k, method, beta_used)
                data = {**r.batch, "old_logps": r.old_logps, "advantages": advantages}
                if r.ref_logps is not None:
                    data["ref_logps"] = r.ref_logps
            # 5. epochs over reshuffled minibatches, one optimiser step per minibatch
            stats = optimise(
                [s.policy],
                optimizer,
                data,
                config,
                loop.generator,
                lambda mb, st, whole: critic_free_minibatch(
                    policy_ddp, mb, config, method, beta_used, st, whole, s.accelerator, loop.step + 1
                ),
                loop.step + 1,
                s.accelerator,
            )
            if one_pass:
                kl, entropy = stats["rollout"]["kl"], stats["rollout"]["entropy"]
            else:
                entropy = r.entropy
            loop.step += 1
            # 6. KL controller, then 7. log means over the step
            loop.kl_ctl.update(kl.mean().item(), len(prompts))
            n, rows = max(stats["tokens"], 1.0), max(stats["rows"], 1.0)
            if loop.step % config.log_every == 0 or loop.step == config.max_steps:
                metrics = {
                    **({"objective/kl": kl.mean()} if r.ref_logps is not None else {}),
                    "objective/scores": r.scores.mean(),
                    "objective/rlhf_reward": (r.scores - beta_used * kl).mean(),
                    "objective/entropy": masked_mean(entropy, mask),
                    "policy/approxkl": stats["policy/approxkl"] / n,
                    "policy/clipfrac": stats["policy/clipfrac"] / n,
                    "policy/first_ratio_dev": stats["first_ratio_dev"],
                    "val/ratio": stats["val/ratio"] / n,
                    "loss/policy": stats["loss/policy"] / rows,
                    "beta": beta_used,
                    "rollout/length": r.rollout.lengths.float().mean(),
                    "rollout/eos_rate": r.rollout.finished.float().mean(),
                    "objective/group_std": r.scores.view(-1, k).std(-1).mean(),
                    **r.watch,  # true utility (world prompts), ensemble disagreement (--monitor-ensemble)
                }
                if method == "grpo":
                    metrics["loss/kl"] = stats["loss/kl"] / rows
                s.run.log(loop.step, {f"{method}/{name}": value for name, value in metrics.items()})
            bar.update(1)
            bar.set_postfix(score=f"{r.scores.mean().item():.3f}", kl=f"{kl.mean().item():.2f}")
            s.run.step_end(loop.step, config.checkpoint_every, stop, lambda: save_loop(s, loop, optimizer))
    bar.close()
    return finish_online(s, method, config, loop)


@stage(RLOOConfig)
def rloo(config: RLOOConfig) -> dict:
    """REINFORCE leave-one-out; returns the summary dict (also in the run folder's summary.json)."""
    return critic_free(config, "rloo")


@stage(GRPOConfig)
def grpo(config: GRPOConfig) -> dict:
    """Group relative policy optimisation; returns the summary dict."""
    return critic_free(config, "grpo")
