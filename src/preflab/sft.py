"""Stage 2, sft: supervised fine-tuning on demonstrations, loss on completion tokens only.

    1. load the model (a HF dir, a run folder, a .gguf or 'smollm2') and the demonstrations
       (a JSONL of prompt/completion or chat messages, or 'world' for the tutoring world's)
    2. tokenise in token space (prompt ids + completion ids ending in EOS) and hold out a share
    3. measure the held-out completion loss before training
    4. AdamW with warm-up + cosine decay for `epochs` (or max_steps / max_seconds), gradient accumulation
    5. measure the held-out completion loss after training, save a HF directory in the run's model/

The loss is the token mean of -log p(completion token | prompt, earlier completion tokens) (the maximum-
likelihood objective of InstructGPT's SFT stage, Ouyang et al. 2022 §3.5), read with the one log-prob
function `sequence_logps`; prompt tokens and padding carry no loss. With gradient accumulation the mean is
taken over all completion tokens of the optimiser step, so `batch 4 x accumulation 1` and
`batch 1 x accumulation 4` give the same gradient.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from preflab.adapters import add_lora, trainable_parameters
from preflab.config import LoraConfig, OptimConfig, check, opt
from preflab.data.preferences import DataError, Demonstration, load_demonstrations, parse_demonstration, split_rows
from preflab.data.tokenize import batches, collate_examples, tokenize_rows
from preflab.logps import sequence_logps
from preflab.models import describe, load_model
from preflab.runs import Run, progress, seed_everything
from preflab.stages import stage
from preflab.training import (
    Budget,
    check_finite,
    join_without_data,
    lr_factor,
    make_accelerator,
    set_lr,
    set_threads,
    shard,
    sync_on_last,
)


@dataclass(kw_only=True)
class SFTConfig(OptimConfig, LoraConfig):
    model: str = opt("", "the model to fine-tune: a Hugging Face directory, a run folder, a .gguf file or 'smollm2'")
    data: str = opt("world", "demonstrations: a JSONL file (prompt/completion or chat messages) or 'world'")
    world_demos: int = opt(2000, "demonstrations to generate when data is 'world'")
    skip_bad_rows: bool = opt(
        False, "skip (and count) bad rows instead of stopping at the first one with its file:line"
    )
    lr: float = opt(3e-4, "peak learning rate (AdamW); 1e-3 damaged the tiny model")
    warmup: float = opt(0.1, "share of training spent warming the learning rate up (then cosine decay)")
    lr_floor: float = opt(0.1, "the cosine decays to lr x lr_floor")
    epochs: float = opt(1.0, "passes over the training demonstrations")
    max_steps: int = opt(0, "stop after this many optimiser steps (0: no step limit beyond epochs)")
    batch_size: int = opt(16, "demonstrations per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimiser step (effective batch = batch_size x grad_accum)")
    max_prompt_length: int = opt(256, "keep at most this many prompt tokens (the end is kept; 0: no limit)")
    max_completion_length: int = opt(256, "keep at most this many completion tokens (the start is kept; 0: no limit)")
    held_out: float = opt(0.1, "share of demonstrations held out to measure the completion loss")
    eval_batch_size: int = opt(32, "demonstrations per batch when measuring the held-out loss")
    eval_every: int = opt(0, "also measure the held-out loss every N steps (0: only before and after)")
    log_every: int = opt(10, "log metrics every N optimiser steps")
    seed: int = opt(0, "random seed (shuffling, split, world demonstrations)")

    def __post_init__(self):
        super().__post_init__()
        check(bool(self.model), "model is required: give --model (a HF directory, a run folder, a .gguf or 'smollm2')")
        check(0 <= self.warmup < 1, f"warmup must be in [0, 1), got {self.warmup}")
        check(0 <= self.lr_floor <= 1, f"lr_floor must be in [0, 1], got {self.lr_floor}")
        check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        check(0 < self.held_out < 1, f"held_out must be in (0, 1), got {self.held_out}")
        check(self.world_demos >= 10, f"world_demos must be >= 10, got {self.world_demos}")
        check(
            self.max_prompt_length >= 0 and self.max_completion_length >= 0,
            f"max lengths must be >= 0, got {self.max_prompt_length} and {self.max_completion_length}",
        )


def sft_loss(
    per_token_logps: torch.Tensor, completion_mask: torch.Tensor, n_tokens: int | float | None = None
) -> torch.Tensor:
    """-sum(log p of completion tokens) / n_tokens: the token-mean negative log-likelihood.

    `n_tokens` defaults to the batch's completion tokens; under gradient accumulation pass the optimiser
    step's total so the micro-batch losses add up to the step's token mean.
    """
    mask = completion_mask.to(per_token_logps.dtype)
    n = mask.sum() if n_tokens is None else n_tokens
    return -(per_token_logps * mask).sum() / max(float(n), 1.0)


def read_demonstrations(spec: str, n_world: int, seed: int, strict: bool = True) -> list[Demonstration]:
    if spec == "world":
        from preflab.world import demonstrations

        return [parse_demonstration(row, f"world:{i}") for i, row in enumerate(demonstrations(n_world, seed), 1)]
    data = load_demonstrations(spec, strict=strict)
    if data.skipped:
        where, why = data.skipped[0]
        print(
            f"[sft] skipped {len(data.skipped)} of {data.lines_read} rows (first: {where}: {why}); "
            f"`preflab data check {spec}` lists them",
            flush=True,
        )
    if not data.rows:
        raise DataError(spec, "no usable demonstration rows", "run `preflab data check` on the file")
    return data.rows


@torch.no_grad()
def heldout_loss(model, examples, pad_id: int, batch_size: int) -> float:
    """Token-mean completion loss over all held-out examples (not a mean of batch means)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    for chunk in batches(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate_examples(chunk, pad_id).items()}
        per_token, _ = sequence_logps(model, batch)
        total += -(per_token * batch["completion_mask"]).sum().item()
        count += batch["completion_mask"].sum().item()
    model.train(was_training)
    return total / max(count, 1.0)


def micro_batches(examples, batch_size: int, grad_accum: int, rng: random.Random):
    """Endless shuffled epochs, yielding one optimiser step's list of micro-batches at a time."""
    while True:
        order = list(examples)
        rng.shuffle(order)
        step = []
        for chunk in batches(order, batch_size):
            step.append(chunk)
            if len(step) == grad_accum:
                yield step
                step = []
        if step:
            yield step


@stage(SFTConfig)
def sft(config: SFTConfig) -> dict:
    set_threads(config.threads)
    seed_everything(config.seed)

    # 1. model and demonstrations
    model, tokenizer = load_model(config.model)
    model = add_lora(model, config, base=config.model)  # --lora-r: only the adapters train
    demos = read_demonstrations(config.data, config.world_demos, config.seed, strict=not config.skip_bad_rows)
    run = Run(config.out or None, "sft", config)
    if config.resume and run.finished_summary():
        print(f"[sft] {run.dir} has already finished; nothing to resume", flush=True)
        return run.finished_summary()
    accelerator = make_accelerator(dtype=config.dtype)
    pad_id = tokenizer.pad_token_id

    # 2. token space, held-out split
    train_rows, held_rows = split_rows(demos, config.held_out, config.seed)
    if not train_rows or not held_rows:
        raise DataError(
            config.data,
            f"{len(demos)} demonstrations are too few to hold out {config.held_out:.0%}",
            "give more rows or change --held-out",
        )
    train, n_trunc = tokenize_rows(tokenizer, train_rows, config.max_prompt_length, config.max_completion_length)
    held, n_trunc_held = tokenize_rows(tokenizer, held_rows, config.max_prompt_length, config.max_completion_length)
    per_step = config.batch_size * config.grad_accum
    steps_per_epoch = math.ceil(len(train) / per_step)
    total_steps = max(1, math.ceil(steps_per_epoch * config.epochs))
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    print(
        f"[sft] {describe(model)}; {len(train)} train / {len(held)} held-out demonstrations "
        f"({n_trunc + n_trunc_held} truncated); {total_steps} steps of {per_step}",
        flush=True,
    )

    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)

    # 3. held-out loss before training (or, resuming, the state of the run at its last checkpoint)
    stream = micro_batches(train, config.batch_size, config.grad_accum, random.Random(config.seed))
    ckpt = run.resume_state()
    if ckpt is None:
        loss_before = heldout_loss(model, held, pad_id, config.eval_batch_size)
        run.log(0, {"sft/eval/loss": loss_before})
        print(f"[sft] held-out completion loss before: {loss_before:.4f}", flush=True)
        step, tokens_seen, seen_examples, window_loss, window_steps, elapsed = 0, 0, 0, 0.0, 0, 0.0
    else:
        ckpt.load_model_weights(accelerator.unwrap_model(model))
        optimizer.load_state_dict(ckpt.state["optimizer"])
        loss_before, step, tokens_seen, seen_examples, window_loss, window_steps, elapsed = ckpt.state["loop"]
        for _ in range(step):  # the data position: the same shuffles, replayed without compute
            next(stream)

    def snapshot() -> dict:
        loop = (loss_before, step, tokens_seen, seen_examples, window_loss, window_steps, budget.elapsed)
        return {"optimizer": optimizer.state_dict(), "loop": loop}

    # 4. the loop
    model.train()
    budget = Budget(total_steps, config.max_seconds, elapsed=elapsed)
    bar = progress(total=total_steps, initial=step, desc="sft")
    with run.guarded() as stop:
        while not budget.done(step):
            # 4a. learning rate: warm-up then cosine
            lr = config.lr * lr_factor(budget.progress(step), config.warmup, floor=config.lr_floor)
            set_lr(optimizer, lr)
            # 4b. one optimiser step's examples, normalised by their total completion tokens; with several
            #     processes (torchrun / accelerate launch) each takes every world-th example, and the loss is
            #     scaled by the world size because DDP averages the processes' gradients
            examples = [ex for chunk in next(stream) for ex in chunk]
            n_tokens = sum(len(ex.completion_ids) for ex in examples)
            chunks = list(batches(shard(examples, accelerator), config.batch_size))
            step_loss = torch.zeros((), device=accelerator.device)
            for i, chunk in enumerate(chunks):
                batch = {k: v.to(accelerator.device) for k, v in collate_examples(chunk, pad_id).items()}
                # 4c. log-probs of completion tokens only (prompt and padding are masked out)
                with sync_on_last(accelerator, model, i, len(chunks)):
                    per_token, _ = sequence_logps(model, batch)
                    loss = sft_loss(per_token, batch["completion_mask"], n_tokens)
                    accelerator.backward(loss * accelerator.num_processes)
                step_loss += loss.detach()
            if not chunks:
                join_without_data(accelerator, model)
            step_loss = accelerator.reduce(step_loss, "sum").item()
            tokens_seen += sum(len(ex.prompt_ids) + len(ex.completion_ids) for ex in examples)
            seen_examples += len(examples)
            # 4d. clip and step
            grad_norm = (
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm) if config.max_grad_norm else None
            )
            check_finite(
                step + 1, **{"sft/loss": step_loss, "sft/grad_norm": grad_norm}
            )  # before it reaches the weights
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_loss, window_steps = window_loss + step_loss, window_steps + 1
            bar.update(1)
            # 4e. log, evaluate, checkpoint
            if step % config.log_every == 0 or step == 1 or budget.done(step):
                tps = tokens_seen / max(budget.elapsed, 1e-6)
                metrics = {
                    "sft/loss": window_loss / window_steps,
                    "sft/lr": lr,
                    "sft/tokens_per_second": tps,
                    "sft/epoch": seen_examples / len(train),
                }
                if grad_norm is not None:
                    metrics["sft/grad_norm"] = float(grad_norm)
                run.log(step, metrics)
                bar.set_postfix(loss=f"{window_loss / window_steps:.3f}", tok_s=f"{tps:,.0f}")
                window_loss, window_steps = 0.0, 0
            if config.eval_every and step % config.eval_every == 0 and not budget.done(step):
                run.log(step, {"sft/eval/loss": heldout_loss(model, held, pad_id, config.eval_batch_size)})
            run.step_end(
                step,
                config.checkpoint_every,
                stop,
                lambda: run.save_checkpoint(step, accelerator.unwrap_model(model), tokenizer, snapshot()),
            )
    bar.close()
    train_seconds = budget.elapsed

    # 5. held-out loss after training; save
    unwrapped = accelerator.unwrap_model(model)
    loss_after = heldout_loss(unwrapped, held, pad_id, config.eval_batch_size)
    run.log(step, {"sft/eval/loss": loss_after})
    unwrapped.eval()
    run.save_model(unwrapped, tokenizer)
    return run.finish(
        {
            "steps": step,
            "epochs": round(seen_examples / len(train), 3),
            "train_examples": len(train),
            "heldout_examples": len(held),
            "truncated": n_trunc + n_trunc_held,
            "heldout_loss_before": loss_before,
            "heldout_loss_after": loss_after,
            "tokens_per_second": tokens_seen / max(train_seconds, 1e-6),
            "model": str(run.model_dir),
        }
    )
