"""PPO with a per-token KL penalty to a frozen reference: the InstructGPT recipe, `preflab ppo`.

    maximise  E_x E_{y ~ pi(.|x)} [ r(x, y) ] - beta KL(pi || pi_ref)

`ppo(config)` reads top to bottom, one rollout batch per step:
    1-3 rollout, score   sample one response per prompt; old and reference log-probs recomputed with
                         `sequence_logps` (temperature on both); scores minus the missing-EOS penalty
                         (`online.rollout_and_score`)
    4 per-token reward   -beta KL_t (k1 or k3) + the score at the last real token
    5 reward whitening   optional, without mean shift
    6 values, GAE        V(s_t) from the value model (`value.py`); GAE(gamma, lambda); advantages whitened
                         with mean shift
    7 update             several epochs over shuffled minibatches, micro-batches accumulated, one optimiser step
                         per minibatch (`online.optimise`); clipped policy loss + vf_coef x clipped value loss
    8 beta               the fixed or adaptive KL controller
    9 log                means over the whole step (never the last minibatch alone)
`docs/algorithms/ppo.md` maps each of the "N implementation details of RLHF with PPO" to the function doing it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from preflab.config import check, opt
from preflab.logps import masked_mean, sequence_logps
from preflab.policy.losses import (
    approx_kl,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    masked_whiten,
    rlhf_rewards,
)
from preflab.policy.online import (
    OnlineConfig,
    add_token_stats,
    check_scores,
    finish_online,
    micro_batches,
    optimise,
    over_rows,
    rollout_and_score,
    save_loop,
    setup_online,
    single_pass,
    start_loop,
    sync_on_last_of,
)
from preflab.policy.value import make_value_model, save_value_model
from preflab.runs import progress
from preflab.stages import stage
from preflab.training import autocast


@dataclass(kw_only=True)
class PPOConfig(OnlineConfig):
    value_init: str = opt(
        "policy",
        "value model start: 'policy' (policy backbone + zero head) or 'reward' "
        "(the reward model, its normalisation folded into the head)",
    )
    value_model: str = opt("", "reward-model folder for value_init=reward (default: --reward)")
    vf_coef: float = opt(0.1, "weight of the value loss in the total loss")
    cliprange_value: float = opt(0.2, "value clip epsilon around the rollout-time values")
    gamma: float = opt(1.0, "discount (RLHF detail #13: 1)")
    lam: float = opt(0.95, "GAE lambda (RLHF detail #13: 0.95)")
    whiten_rewards: bool = opt(False, "whiten the per-token rewards of each rollout batch (without mean shift)")

    def __post_init__(self):
        super().__post_init__()
        check(
            self.batch_size % self.mini_batch_size == 0,
            f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})",
        )
        check(
            self.value_init in ("policy", "reward"), f"value_init must be 'policy' or 'reward', got {self.value_init!r}"
        )
        check(
            0 <= self.gamma <= 1 and 0 <= self.lam <= 1,
            f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}",
        )
        check(self.vf_coef >= 0, f"vf_coef must be >= 0, got {self.vf_coef}")


def rollout_targets(old_logps, ref_logps, old_values, scores, mask, beta: float, config: PPOConfig, step: int):
    """Steps 4-6 on a rollout batch: per-token rewards (-beta KL_t, the score at the last real token), the KL
    check, optional reward whitening, GAE and whitened advantages. Returns (advantages, returns, kl [B, C],
    rlhf_reward [B])."""
    # 4. per-token reward: -beta KL_t, score at the last real token (details #5, #11)
    rewards, kl = rlhf_rewards(old_logps, ref_logps, scores, mask, beta, config.kl_estimator)
    rlhf_reward = rewards.sum(-1)
    check_scores(step, scores, kl.sum(-1), config)  # NaN, a broken reward, KL past max_kl
    # 5. reward whitening without mean shift (detail #14)
    if config.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    # 6. GAE, advantage whitening with mean shift (details #13, #14)
    advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
    advantages = masked_whiten(advantages, mask, shift_mean=True)
    return advantages, returns, kl, rlhf_reward


def ppo_minibatch(
    policy,
    value_model,
    mb: dict,
    config: PPOConfig,
    stats: dict | None = None,
    whole: dict | None = None,
    ddp=None,
    beta: float = 0.0,
    step: int = 0,
) -> dict:
    """Forward/backward over the micro-batches of one minibatch; gradients summed, loss normalised by the
    minibatch's token count so that 4 micro-batches of 1 equal 1 micro-batch of 4. `mb` holds the batch plus
    old_logps, old_values, advantages, returns. Accumulates per-token sums into `stats`. With several processes
    `mb` is this process's share of the minibatch `whole` (the normaliser's), `ddp` the accelerator: the loss
    is scaled by the world size (DDP averages gradients), which are all-reduced on the last micro-batch.

    Single pass (`online.single_pass`, one process only: `mb` is the whole rollout in one micro-batch, with
    ref_logps and scores instead of old_logps, old_values, advantages, returns): the forwards' own log-probs and
    values, detached, are the old ones; steps 4-6 (`rollout_targets`, with `beta`) run on them before the loss,
    and `stats['rollout']` returns what the step logs (rows in the minibatch's order)."""
    stats = stats if stats is not None else {}
    n_tokens = (mb if whole is None else whole)["completion_mask"].float().sum().clamp(min=1)
    chunks = list(micro_batches(mb, config.micro_batch_size))
    for i, mu in enumerate(chunks):
        mask = mu["completion_mask"].float()
        with sync_on_last_of(ddp, [policy, value_model], i, len(chunks)) if ddp else contextlib.nullcontext():
            with autocast(config.dtype, mask.device):  # --dtype: the forwards only, the backward outside
                logp, _, entropy = sequence_logps(policy, mu, config.temperature, return_entropy=True)
                values = value_model(mu)
            if "old_logps" in mu:
                old_logps, old_values, advantages, returns = (
                    mu["old_logps"],
                    mu["old_values"],
                    mu["advantages"],
                    mu["returns"],
                )
            else:
                assert ddp is None and len(chunks) == 1, "single pass: one process, one micro-batch"
                old_logps, old_values = logp.detach(), values.detach()
                with torch.no_grad():
                    advantages, returns, kl, rlhf_reward = rollout_targets(
                        old_logps, mu["ref_logps"], old_values, mu["scores"], mask, beta, config, step
                    )
                stats["rollout"] = {
                    "kl": kl,
                    "rlhf_reward": rlhf_reward,
                    "old_values": old_values,
                    "returns": returns,
                    "entropy": entropy,
                    "mask": mask,
                    "scores": mu["scores"],
                }
            pg, ratio, pg_clipped = clipped_policy_loss(logp, old_logps, advantages, config.cliprange)
            vf, vf_clipped = clipped_value_loss(values, old_values, returns, config.cliprange_value)
            loss = ((pg + config.vf_coef * vf) * mask).sum() / n_tokens
            (loss * ddp.num_processes if ddp else loss).backward()
        with torch.no_grad():
            add_token_stats(
                stats,
                {
                    "loss/policy": pg,
                    "loss/value": vf,
                    "policy/clipfrac": pg_clipped.float(),
                    "policy/approxkl": approx_kl(logp, old_logps),
                    "val/ratio": ratio,
                    "val/clipfrac": vf_clipped.float(),
                    "policy/entropy": entropy,
                },
                mask,
            )
    return stats


@torch.no_grad()
def batch_values(value_model, batch: dict, chunk: int) -> torch.Tensor:
    """V(s_t) [B, C] for a whole rollout batch, `chunk` rows at a time."""
    return torch.cat([value_model(mu) for mu in micro_batches(batch, chunk)])


@stage(PPOConfig)
def ppo(config: PPOConfig) -> dict:
    s = setup_online(config, "ppo")
    value_model = make_value_model(s.policy, s.tokenizer, config.value_init, config.value_model or config.reward).to(
        s.device
    )
    optimizer = torch.optim.AdamW(
        [*s.policy.parameters(), *value_model.parameters()], lr=config.lr, eps=1e-5, weight_decay=config.weight_decay
    )
    critic = {"value_model": value_model}
    loop = start_loop(s, config, optimizer, critic)
    # the update's forward/backward: DDP-wrapped with several processes (torchrun / accelerate launch)
    policy_ddp, value_ddp = s.for_training(s.policy), s.for_training(value_model)
    bar = progress(total=config.max_steps, initial=loop.step, desc="ppo")
    with s.run.guarded() as stop:
        while not loop.budget.done(loop.step):
            # 1-3. rollout (pure sampling at temperature T, stop at EOS: details #3, #4); old and reference log-probs
            #      with the one log-prob function (temperature on both); scores with the missing-EOS penalty
            prompts = next(loop.prompts)
            one_pass = single_pass(config, len(prompts), s.processes)
            r = rollout_and_score(s, prompts, config, loop.step, old_logps=not one_pass)
            mask = r.mask
            beta_used = loop.kl_ctl.value
            if one_pass:  # steps 4-6 inside the update, on its forwards' own log-probs and values
                data = {**r.batch, "ref_logps": r.ref_logps, "scores": r.scores}
            else:
                with torch.no_grad():
                    # 6. values: one forward of the value model over the rollout
                    with s.precision():
                        old_values = over_rows(
                            s, r.batch, lambda b: batch_values(value_model, b, config.mini_batch_size)
                        )
                    advantages, returns, kl, rlhf_reward = rollout_targets(
                        r.old_logps, r.ref_logps, old_values, r.scores, mask, beta_used, config, loop.step + 1
                    )
                data = {
                    **r.batch,
                    "old_logps": r.old_logps,
                    "old_values": old_values,
                    "advantages": advantages,
                    "returns": returns,
                }
            # 7. several epochs over reshuffled minibatches; one optimiser step per minibatch (details #16, #17)
            stats = optimise(
                [s.policy, value_model],
                optimizer,
                data,
                config,
                loop.generator,
                lambda mb, st, whole: ppo_minibatch(
                    policy_ddp, value_ddp, mb, config, st, whole, s.accelerator, beta_used, loop.step + 1
                ),
                loop.step + 1,
                s.accelerator,
            )
            entropy, scores = r.entropy, r.scores
            if one_pass:  # what the update computed, rows in its order
                got = stats["rollout"]
                kl, rlhf_reward, old_values, returns = got["kl"], got["rlhf_reward"], got["old_values"], got["returns"]
                entropy, mask, scores = got["entropy"], got["mask"], got["scores"]
            loop.step += 1
            # 8. KL controller on the mean per-sequence KL of this batch (detail #12)
            mean_kl = kl.sum(-1).mean().item()
            loop.kl_ctl.update(mean_kl, len(scores))
            # 9. log: means over the whole step
            n = max(stats["tokens"], 1.0)
            if loop.step % config.log_every == 0 or loop.step == config.max_steps:
                s.run.log(
                    loop.step,
                    {
                        "ppo/objective/kl": mean_kl,
                        "ppo/objective/scores": r.scores.mean(),
                        "ppo/objective/rlhf_reward": rlhf_reward.mean(),
                        "ppo/objective/entropy": masked_mean(entropy, mask),
                        "ppo/policy/approxkl": stats["policy/approxkl"] / n,
                        "ppo/policy/clipfrac": stats["policy/clipfrac"] / n,
                        "ppo/policy/first_ratio_dev": stats["first_ratio_dev"],
                        "ppo/val/ratio": stats["val/ratio"] / n,
                        "ppo/val/clipfrac": stats["val/clipfrac"] / n,
                        "ppo/val/explained_variance": explained_variance(old_values, returns, mask),
                        "ppo/loss/policy": stats["loss/policy"] / n,
                        "ppo/loss/value": stats["loss/value"] / n,
                        "ppo/beta": beta_used,
                        "ppo/rollout/length": r.rollout.lengths.float().mean(),
                        "ppo/rollout/eos_rate": r.rollout.finished.float().mean(),
                        **{f"ppo/{name}": value for name, value in r.watch.items()},  # true utility, disagreement
                    },
                )
            bar.update(1)
            bar.set_postfix(score=f"{r.scores.mean().item():.3f}", kl=f"{mean_kl:.2f}")
            s.run.step_end(loop.step, config.checkpoint_every, stop, lambda: save_loop(s, loop, optimizer, critic))
    bar.close()
    value_dir = s.run.dir / "value_model"
    if s.run.main:
        save_value_model(value_model, value_dir)
    return finish_online(s, "ppo", config, loop, extra={"value_model": str(value_dir)})
