"""What both libraries train on: one tokenizer, one Llama weights directory, one set of data files.

Everything is built locally (nothing is downloaded): the tokenizer is preflab's byte-level BPE trained on a few
lines of the tutoring world's corpus, the model a `transformers.LlamaConfig` initialised with a fixed seed and
saved once as safetensors, the data strings of decimal digits. The tokenizer splits digits one per token, so a
string of n digits is exactly n tokens in both libraries and every example has the length the benchmark asks
for, with no truncation rule of either library involved.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sizes:
    """One benchmark's model and work sizes (the same for both libraries)."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    ffn: int = 1024
    vocab: int = 8000  # model rows; the tokenizer uses the first few hundred, the LM head all of them
    prompt_len: int = 64  # tokens of each prompt (offline methods) before the BOS
    completion_len: int = 64  # tokens of each completion / chosen / rejected
    batch: int = 8  # sequences (sft), pairs (reward, dpo) per optimiser step
    gen_prompts: int = 2  # prompts per rollout (online methods)
    gen_k: int = 4  # samples per prompt
    gen_prompt_len: int = 32  # tokens of each online prompt
    gen_tokens: int = 32  # new tokens per sample
    rows: int = 32  # data rows written at least (run.py writes enough for a fresh batch every step)


QUICK = Sizes(
    hidden=64,
    layers=2,
    heads=2,
    ffn=128,
    vocab=1000,
    prompt_len=16,
    completion_len=16,
    batch=2,
    gen_prompts=2,
    gen_k=2,
    gen_prompt_len=8,
    gen_tokens=8,
    rows=32,
)


def digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def build(work: Path, sizes: Sizes, seed: int = 0) -> dict:
    """Write tokenizer, model and data under `work`; returns the paths and the model's parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from preflab.models import train_tokenizer
    from preflab.world import corpus

    work.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus(400, seed=seed), vocab_size=512)
    check_digits_are_single_tokens(tokenizer)
    config = LlamaConfig(
        vocab_size=max(sizes.vocab, len(tokenizer)),
        hidden_size=sizes.hidden,
        intermediate_size=sizes.ffn,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model_dir = work / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    params = sum(p.numel() for p in model.parameters())

    rng = random.Random(seed)
    n = sizes.rows
    files = {
        "sft": [
            {"prompt": digits(rng, sizes.prompt_len), "completion": digits(rng, sizes.completion_len)} for _ in range(n)
        ],
        "pairs": [
            {
                "prompt": digits(rng, sizes.prompt_len),
                "chosen": digits(rng, sizes.completion_len),
                "rejected": digits(rng, sizes.completion_len),
            }
            for _ in range(n)
        ],
        "prompts": [{"prompt": digits(rng, sizes.gen_prompt_len)} for _ in range(n)],
    }
    paths = {"model": str(model_dir), "params": params, "sizes": asdict(sizes)}
    for name, rows in files.items():
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = str(path)
    (work / "assets.json").write_text(json.dumps(paths, indent=1))
    return paths


def check_digits_are_single_tokens(tokenizer) -> None:
    ids = tokenizer("0123456789", add_special_tokens=False)["input_ids"]
    if len(ids) != 10:
        raise RuntimeError(f"the benchmark needs one token per digit; the tokenizer gave {len(ids)} for 10 digits")
