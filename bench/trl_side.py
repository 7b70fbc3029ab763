"""TRL's side: each method is one trainer built from the same model directory and data files, `steps` steps.

Settings chosen to match `preflab_side.py`: fp32 (TRL's configs default to bf16, set off here), no
truncation (max_length above the data's lengths), no evaluation, logging or saving, one optimiser step per
rollout for the online methods (steps_per_generation 1, num_iterations 1, the whole rollout in one batch),
GRPO beta 0 and RLOO beta 0.05 (TRL's defaults), the same reward function (bench/rewards.py).
"""

from __future__ import annotations

from rewards import trl_digit_reward


def common_args(assets: dict, steps: int, out: str, batch: int) -> dict:
    return {
        "output_dir": out,
        "max_steps": steps,
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-6,
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "logging_strategy": "no",
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }


def dataset(path: str):
    from datasets import load_dataset

    return load_dataset("json", data_files=path, split="train")


def run(method: str, assets: dict, steps: int, threads: int, out: str) -> None:
    from transformers import AutoTokenizer

    s = assets["sizes"]
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    offline_len = 2 * (s["prompt_len"] + s["completion_len"])  # longer than any example: no truncation
    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(
            **common_args(assets, steps, out, s["batch"]), max_length=offline_len, completion_only_loss=True
        )
        trainer = SFTTrainer(
            assets["model"], args=args, train_dataset=dataset(assets["sft"]), processing_class=tokenizer
        )
    elif method == "reward":
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(**common_args(assets, steps, out, s["batch"]), max_length=offline_len)
        trainer = RewardTrainer(
            assets["model"], args=args, train_dataset=dataset(assets["pairs"]), processing_class=tokenizer
        )
    elif method in ("dpo", "dpo_precomputed"):
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(
            **common_args(assets, steps, out, s["batch"]),
            max_length=offline_len,
            beta=0.1,
            precompute_ref_log_probs=method == "dpo_precomputed",
        )
        trainer = DPOTrainer(
            assets["model"], args=args, train_dataset=dataset(assets["pairs"]), processing_class=tokenizer
        )
    elif method in ("grpo", "rloo"):
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        config_cls, trainer_cls = (RLOOConfig, RLOOTrainer) if method == "rloo" else (GRPOConfig, GRPOTrainer)
        rows = s["gen_prompts"] * s["gen_k"]
        args = config_cls(
            **common_args(assets, steps, out, rows),
            num_generations=s["gen_k"],
            max_completion_length=s["gen_tokens"],
            steps_per_generation=1,
            num_iterations=1,
            beta=0.05 if method == "rloo" else 0.0,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
        )
        trainer = trainer_cls(
            assets["model"],
            reward_funcs=trl_digit_reward,
            args=args,
            train_dataset=dataset(assets["prompts"]),
            processing_class=tokenizer,
        )
    else:
        raise ValueError(f"TRL side: unknown method {method!r} (TRL has no PPO in this benchmark)")
    trainer.train()
