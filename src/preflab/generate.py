"""Stage 3, generate: sample candidate responses from a policy, and optionally comparison pairs.

1. load the policy (a HF dir, a run folder, a .gguf or 'smollm2') and the prompts
   (a JSONL of {"prompt": text or chat messages} rows, or 'world' for the tutoring world's)
2. encode each prompt in token space (chat template for messages), keeping its end if too long
3. sample `n` responses per prompt with the one rollout engine (`preflab.rollout.generate`: KV cache,
   left padding, pure sampling at the temperature, stops at EOS)
4. write `responses.jsonl` ({prompt, responses: [...]}) and, with --pairs, `pairs.jsonl`: every pair of
   distinct responses of a prompt ({prompt, response_a, response_b}), in a random A/B order, ready for
   the collection app or the simulated annotators
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from preflab.config import PrecisionConfig, check, opt
from preflab.data.preferences import load_prompts, write_jsonl
from preflab.data.tokenize import encode_prompt
from preflab.models import load_model
from preflab.rollout import generate
from preflab.runs import Run, progress, seed_everything
from preflab.stages import stage
from preflab.training import autocast, set_threads


@dataclass(kw_only=True)
class GenerateConfig(PrecisionConfig):
    model: str = opt("", "the policy: a Hugging Face directory, a run folder, a .gguf file or 'smollm2'")
    prompts: str = opt("world", "a JSONL file of {\"prompt\": text or chat messages} rows, or 'world'")
    n_prompts: int = opt(200, "prompts to use: drawn from the world, or the file's first N (0: the whole file)")
    split: str = opt("train", "world prompts: the 'train' or the held-out 'eval' question split")
    n: int = opt(4, "responses sampled per prompt (-k as well)", aliases=["-k"])
    max_new_tokens: int = opt(48, "longest response in tokens (a response that reaches it has no EOS)")
    max_prompt_length: int = opt(256, "keep at most this many prompt tokens (the end is kept; 0: no limit)")
    temperature: float = opt(1.0, "sampling temperature (logits are divided by it)")
    top_k: int = opt(0, "sample from the k most likely tokens only (0: off; off keeps log-probs on-policy)")
    top_p: float = opt(1.0, "nucleus sampling threshold (1: off)")
    batch_size: int = opt(64, "sequences sampled together")
    pairs: bool = opt(False, "also write pairs.jsonl: every pair of distinct responses per prompt")
    seed: int = opt(0, "random seed (world prompts, sampling, A/B order)")

    def __post_init__(self):
        super().__post_init__()
        check(bool(self.model), "model is required: give --model (a HF directory, a run folder, a .gguf or 'smollm2')")
        check(self.n >= 1, f"n must be >= 1, got {self.n}")
        check(self.n_prompts >= 0, f"n_prompts must be >= 0, got {self.n_prompts}")
        check(
            not (self.prompts == "world" and self.n_prompts == 0), "n_prompts must be > 0 with prompts 'world', got 0"
        )
        check(self.split in ("train", "eval"), f"split must be 'train' or 'eval', got {self.split!r}")
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


def read_prompts(spec: str, n: int, split: str, seed: int) -> list:
    """Prompts (strings or chat message lists) from 'world' or a JSONL file of `prompt` rows."""
    if spec == "world":
        from preflab.world import prompts

        return prompts(n, seed=seed, split=split)
    rows = load_prompts(spec).rows
    return rows[:n] if n else rows


def read_candidate_pairs(spec: str | Path, seed: int, max_pairs: int = 0) -> list[tuple]:
    """(prompt, response_a, response_b) from a `pairs.jsonl` this stage wrote (or its run folder), shuffled with
    `seed`, the first `max_pairs` (0: all)."""
    path = Path(spec)
    path = path / "pairs.jsonl" if path.is_dir() else path
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    pairs = [(r["prompt"], r["response_a"], r["response_b"]) for r in rows]
    random.Random(seed).shuffle(pairs)
    return pairs[:max_pairs] if max_pairs else pairs


def candidate_pairs(prompt, responses: list[str], rng: random.Random) -> list[dict]:
    """Every pair of distinct responses (identical texts carry no comparison), A/B order shuffled."""
    distinct = list(dict.fromkeys(r for r in responses if r.strip()))
    pairs = []
    for a, b in itertools.combinations(distinct, 2):
        if rng.random() < 0.5:
            a, b = b, a
        pairs.append({"prompt": prompt, "response_a": a, "response_b": b})
    return pairs


@stage(GenerateConfig)
def generate_stage(config: GenerateConfig) -> dict:
    set_threads(config.threads)
    seed_everything(config.seed)

    # 1. policy and prompts
    model, tokenizer = load_model(config.model)
    prompts = read_prompts(config.prompts, config.n_prompts, config.split, config.seed)
    run = Run(config.out or None, "generate", config, tensorboard=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # 2. token space (the prompt's end is kept)
    prompt_ids = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt)
        prompt_ids.append(ids[-config.max_prompt_length :] if config.max_prompt_length else ids)

    # 3. sample n responses per prompt, a batch of sequences at a time
    generator = torch.Generator(device=device).manual_seed(config.seed)
    flat = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(config.n)]
    texts: list[str] = []
    finished, lengths = [], []
    bar = progress(total=len(flat), desc="generate", unit="seq")
    for start in range(0, len(flat), config.batch_size):
        chunk = [ids for _, ids in flat[start : start + config.batch_size]]
        with autocast(config.dtype, device):
            rollout = generate(
                model,
                tokenizer,
                chunk,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                top_k=config.top_k,
                top_p=config.top_p,
                batch_size=config.batch_size,
                generator=generator,
            )
        texts += rollout.texts
        finished += rollout.finished.tolist()
        lengths += rollout.lengths.tolist()
        bar.update(len(chunk))
    bar.close()

    # 4. write responses (and pairs)
    rows = [{"prompt": p, "responses": texts[i * config.n : (i + 1) * config.n]} for i, p in enumerate(prompts)]
    write_jsonl(run.dir / "responses.jsonl", rows)
    summary = {"prompts": len(prompts), "responses": len(texts)}
    if config.pairs:
        rng = random.Random(config.seed)
        pairs = [pair for row in rows for pair in candidate_pairs(row["prompt"], row["responses"], rng)]
        write_jsonl(run.dir / "pairs.jsonl", pairs)
        summary["pairs"] = len(pairs)
    distinct = sum(len(set(r["responses"])) for r in rows) / max(len(texts), 1)
    metrics = {
        "generate/mean_length": sum(lengths) / max(len(lengths), 1),
        "generate/eos_rate": sum(finished) / max(len(finished), 1),
        "generate/distinct": distinct,
    }
    if config.prompts == "world":
        from preflab.world import true_utility

        utilities = [true_utility(r["prompt"], t).total for r in rows for t in r["responses"]]
        metrics["generate/true_utility"] = sum(utilities) / len(utilities)
    run.log(0, metrics)
    summary.update({k.split("/")[-1]: v for k, v in metrics.items()})
    summary["responses_file"] = str(run.dir / "responses.jsonl")
    return run.finish(summary)
