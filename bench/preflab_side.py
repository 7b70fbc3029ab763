"""preflab's side: each method is one call of its stage function with its config class, `steps` optimiser steps.

Settings chosen to match `trl_side.py`: no truncation (the data already has its lengths), one optimiser step per
rollout for the online methods (epochs 1, minibatch = the whole rollout), GRPO with beta 0 (TRL's default),
RLOO with beta 0.05 (TRL's default), evaluation off or constant (it cancels in the difference of two run lengths).
"""

from __future__ import annotations

REWARD_FN = "rewards:digit_reward"  # bench/rewards.py; bench/ is on sys.path when the worker runs


def offline_common(assets: dict, steps: int, threads: int, out: str) -> dict:
    return {
        "model": assets["model"],
        "max_steps": steps,
        "threads": threads,
        "out": out,
        "seed": 0,
        "max_prompt_length": 0,
        "max_completion_length": 0,
    }


def online_common(assets: dict, steps: int, threads: int, out: str) -> dict:
    s = assets["sizes"]
    rows = s["gen_prompts"] * s["gen_k"]
    return {
        "model": assets["model"],
        "reward": REWARD_FN,
        "prompts": assets["prompts"],
        "eval_prompts": 0,
        "max_steps": steps,
        "threads": threads,
        "out": out,
        "seed": 0,
        "batch_size": s["gen_prompts"],
        "mini_batch_size": rows,
        "micro_batch_size": rows,
        "epochs": 1,
        "max_new_tokens": s["gen_tokens"],
        "lr": 1e-6,
        "missing_eos_penalty": 0.0,
    }


def run(method: str, assets: dict, steps: int, threads: int, out: str) -> None:
    s = assets["sizes"]
    if method == "sft":
        from preflab.sft import SFTConfig, sft

        sft(
            SFTConfig(
                **offline_common(assets, steps, threads, out),
                data=assets["sft"],
                batch_size=s["batch"],
                epochs=1000.0,
                held_out=0.05,
                eval_batch_size=s["batch"],
                log_every=10**6,
            )
        )
    elif method == "reward":
        from preflab.reward.train import RewardConfig, train_reward

        train_reward(
            RewardConfig(
                **offline_common(assets, steps, threads, out),
                data=assets["pairs"],
                batch_size=s["batch"],
                epochs=1000,
                held_out=0.05,
                eval_batch_size=s["batch"],
                reference_rows=s["batch"],
                log_every=10**6,
            )
        )
    elif method in ("dpo", "dpo_precomputed"):
        from preflab.policy.dpo import DPOConfig, dpo

        dpo(
            DPOConfig(
                **offline_common(assets, steps, threads, out),
                data=assets["pairs"],
                batch_size=s["batch"],
                precompute_ref=method == "dpo_precomputed",
                epochs=1000.0,
                held_out=0.05,
                eval_every=10**6,
                log_every=10**6,
            )
        )
    elif method == "grpo":
        from preflab.policy.rloo import GRPOConfig, grpo

        grpo(GRPOConfig(**online_common(assets, steps, threads, out), k=s["gen_k"], beta=0.0))
    elif method == "rloo":
        from preflab.policy.rloo import RLOOConfig, rloo

        rloo(RLOOConfig(**online_common(assets, steps, threads, out), k=s["gen_k"], beta=0.05))
    elif method == "ppo":
        from preflab.policy.ppo import PPOConfig, ppo

        common = online_common(assets, steps, threads, out)
        common["batch_size"] = common["mini_batch_size"]  # PPO samples one response per prompt
        ppo(PPOConfig(**common))
    else:
        raise ValueError(f"preflab side: unknown method {method!r}")
