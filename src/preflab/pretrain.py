"""Stage 1, pretrain: a small Llama-style causal LM trained from scratch on text.

1. read the corpus (a file, a folder of .txt/.jsonl files, or the built-in tutoring-world corpus)
2. train a byte-level BPE tokenizer on it (digits split; pad, bos, eos distinct)
3. build a `transformers` LlamaConfig sized by the preset and a fresh model
4. pack the token stream into fixed windows; hold out a share of documents for perplexity
5. AdamW with warm-up + cosine decay, by steps or by a wall-clock budget, checkpointing as it goes
6. save a normal Hugging Face directory (safetensors, tokenizer, chat template) and report held-out ppl
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from preflab.config import ConfigError, OptimConfig, check, opt
from preflab.models import SIZES, describe, tiny_config, train_tokenizer
from preflab.runs import Run, progress, seed_everything
from preflab.stages import stage
from preflab.training import Budget, check_finite, lr_factor, make_accelerator, set_lr, set_threads


@dataclass(kw_only=True)
class PretrainConfig(OptimConfig):
    corpus: str = opt("world", "a text file, a folder of .txt files, or 'world' for the built-in tutoring corpus")
    world_docs: int = opt(60000, "documents to generate when corpus is 'world'")
    size: str = opt("tiny", "model size preset: tiny (1.1M parameters) or small")
    vocab_size: int = opt(0, "BPE vocabulary size (0: the size preset's)")
    seq_len: int = opt(128, "tokens per training window")
    batch_size: int = opt(32, "windows per optimiser step")
    lr: float = opt(3e-3, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    warmup: float = opt(0.05, "share of the budget spent warming the learning rate up")
    max_seconds: float = opt(120.0, "stop after this many seconds of training (0: no time limit)")
    held_out: float = opt(0.02, "share of documents held out for perplexity")
    eval_batches: int = opt(20, "batches of held-out windows for the final perplexity")
    log_every: int = opt(20, "log metrics every N steps")
    checkpoint_every: int = opt(200, "write a checkpoint every N steps (0: only when stopped by Ctrl-C)")

    def __post_init__(self):
        super().__post_init__()
        check(self.size in SIZES, f"size must be one of {sorted(SIZES)}, got {self.size!r}")
        check(
            self.max_steps > 0 or self.max_seconds > 0,
            f"give max_steps or max_seconds, got {self.max_steps} and {self.max_seconds}",
        )
        check(self.seq_len >= 8, f"seq_len must be >= 8, got {self.seq_len}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(0 <= self.held_out < 0.5, f"held_out must be in [0, 0.5), got {self.held_out}")
        check(self.world_docs >= 10, f"world_docs must be >= 10, got {self.world_docs}")


def read_corpus(spec: str, world_docs: int, seed: int) -> list[str]:
    from preflab.data.preferences import DataError

    if spec == "world":
        from preflab.world import corpus

        return corpus(world_docs, seed=seed)
    path = Path(spec)
    if not path.exists():
        raise DataError(spec, "corpus not found", "give a text file, a folder of .txt files, or 'world'")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    docs = []
    for f in files:
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        docs.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DataError(f"{f}:{n}", "expected a JSON object with a 'text' field") from None
        else:
            docs += [d for d in f.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    if not docs:
        raise DataError(spec, "the corpus holds no text")
    return docs


def token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents as one id stream, each starting with BOS and ending with EOS."""
    ids: list[int] = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        if not enc or enc[0] != bos:
            enc = [bos] + enc
        if enc[-1] != eos:
            enc = enc + [eos]
        ids += enc
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int, batch_size: int, n_batches: int) -> float:
    """exp(mean next-token loss) over consecutive held-out windows."""
    model.eval()
    n = min(n_batches * batch_size, max(1, (len(stream) - 1) // seq_len))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        rows = torch.stack([stream[j * seq_len : (j + 1) * seq_len] for j in range(i, min(n, i + batch_size))]).to(
            device
        )
        loss = model(input_ids=rows, labels=rows).loss
        total += loss.item() * rows.numel()
        count += rows.numel()
    model.train()
    return math.exp(total / max(count, 1))


@stage(PretrainConfig)
def pretrain(config: PretrainConfig) -> dict:
    from transformers import LlamaForCausalLM

    set_threads(config.threads)
    seed_everything(config.seed)
    run = Run(config.out or None, "pretrain", config)
    if config.resume and run.finished_summary():
        print(f"[pretrain] {run.dir} has already finished; nothing to resume", flush=True)
        return run.finished_summary()
    accelerator = make_accelerator(dtype=config.dtype)
    if config.batch_size % accelerator.num_processes:
        raise ConfigError(
            f"batch_size {config.batch_size} must be a multiple of the {accelerator.num_processes} "
            "processes (each takes an equal share of every batch)"
        )

    # 1-2. corpus and tokenizer
    docs = read_corpus(config.corpus, config.world_docs, config.seed)
    random.Random(config.seed).shuffle(docs)
    n_held = max(1, int(len(docs) * config.held_out))
    held_docs, train_docs = docs[:n_held], docs[n_held:]
    vocab = config.vocab_size or SIZES[config.size].vocab_size
    tokenizer = train_tokenizer(train_docs, vocab_size=vocab)

    # 3. model
    model = LlamaForCausalLM(tiny_config(config.size, tokenizer))
    print(f"[pretrain] {describe(model)}, vocabulary {len(tokenizer)}, {len(train_docs)} documents", flush=True)

    # 4. token streams
    train_stream, held_stream = token_stream(tokenizer, train_docs), token_stream(tokenizer, held_docs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    generator = torch.Generator().manual_seed(config.seed)
    step, tokens_seen, elapsed, loss = 0, 0, 0.0, torch.tensor(float("nan"))
    ckpt = run.resume_state()
    if ckpt is not None:
        ckpt.load_model_weights(accelerator.unwrap_model(model))
        optimizer.load_state_dict(ckpt.state["optimizer"])
        generator.set_state(ckpt.state["generator"])
        step, tokens_seen, elapsed, loss = ckpt.state["loop"]

    def snapshot() -> dict:
        return {
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "loop": (step, tokens_seen, budget.elapsed, loss.detach()),
        }

    # 5. the loop
    budget = Budget(config.max_steps, config.max_seconds, elapsed=elapsed)
    bar = progress(total=config.max_steps or None, initial=step, desc="pretrain")
    with run.guarded() as stop:
        while not budget.done(step):
            lr = config.lr * lr_factor(budget.progress(step), config.warmup, floor=0.1)
            set_lr(optimizer, lr)
            batch = windows(train_stream, config.seq_len, config.batch_size, generator).to(accelerator.device)
            # with several processes each takes every world-th window; DDP averages their equal-sized means
            mine = batch[accelerator.process_index :: accelerator.num_processes]
            loss = model(input_ids=mine, labels=mine).loss
            accelerator.backward(loss)
            loss = accelerator.reduce(loss.detach(), "mean")
            check_finite(step + 1, **{"pretrain/loss": loss})
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += batch.numel()
            bar.update(1)
            if step % config.log_every == 0 or step == 1:
                tps = tokens_seen / max(budget.elapsed, 1e-6)
                run.log(step, {"pretrain/loss": loss.item(), "pretrain/lr": lr, "pretrain/tokens_per_second": tps})
                bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tps:,.0f}")
            run.step_end(
                step,
                config.checkpoint_every,
                stop,
                lambda: run.save_checkpoint(step, accelerator.unwrap_model(model), tokenizer, snapshot()),
            )
    bar.close()

    # 6. save and report
    unwrapped = accelerator.unwrap_model(model)
    ppl = perplexity(unwrapped, held_stream, config.seq_len, config.batch_size, config.eval_batches)
    run.log(step, {"pretrain/eval/perplexity": ppl})
    unwrapped.eval()
    run.save_model(unwrapped, tokenizer)
    return run.finish(
        {
            "steps": step,
            "tokens": tokens_seen,
            "train_loss": loss.item(),
            "heldout_perplexity": ppl,
            "vocab_size": len(tokenizer),
            "tokens_per_second": tokens_seen / max(budget.elapsed, 1e-6),
            "model": str(run.model_dir),
        }
    )
