"""Stage `preflab dpo`: direct preference optimisation and its relatives, against a frozen reference.

    1. read the comparisons (a JSONL file, or `world`: simulated votes on world pairs), split off a held-out set,
       skip ties (counted: a tie says neither response is better, which no loss here can use)
    2. load the policy and the reference (the same model unless --ref-model), tokenise in token space
    3. precompute the reference log-probs once over the whole dataset (--precompute-ref, default on), then drop
       the reference model; otherwise score each batch with it as we go (the same numbers, more compute)
    4. the loop: per optimiser step, `gradient_accumulation_steps` micro-batches, each ONE pass over chosen
       and rejected rows (`collate_pairs` puts chosen rows first; their shared prompt runs once), `dpo_loss`,
       mean, backward; warm-up + cosine lr; by epochs, steps or seconds
    5. evaluate on the held-out pairs every `eval_every` steps and at the end
    6. save the policy as a Hugging Face directory in `run.model_dir`

What the trained policy does when it samples (true utility, proxy reward, KL, win rates against the reference)
is measured by `preflab eval policy`, the same way for every policy, not here.

Where we depart from the papers: all losses use summed log-probs of the completion unless
`length_normalize` (then the mean per completion token, as SimPO and TRL's IPO do); the last incomplete batch
of an epoch is dropped so that every optimiser step averages the same number of pairs.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from preflab.adapters import add_lora, reference_of
from preflab.config import LoraConfig, OptimConfig, check, opt
from preflab.data import DataError, collate_pairs, load_preferences, pair_length, split_rows, tokenize_rows
from preflab.data.preferences import SPLIT_BY, SPLIT_BY_HELP
from preflab.logps import sequence_logps
from preflab.runs import Run, progress, seed_everything
from preflab.stages import stage
from preflab.training import (
    Budget,
    autocast,
    check_finite,
    join_without_data,
    length_grouped,
    lr_factor,
    make_accelerator,
    set_lr,
    set_threads,
    shard,
    sync_on_last,
)

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
):
    """(losses [B], chosen_rewards [B], rejected_rewards [B]); the caller takes `losses.mean()`.

    h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l); the implicit rewards are beta * log(pi/pi_ref),
    detached (they are for logging, not for the gradient).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        # Rafailov et al. 2023, eq. 7: -log sigmoid(beta h). With eps > 0: conservative DPO (cDPO, Mitchell 2023),
        # the cross-entropy against labels that are flipped with probability eps.
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        # Chowdhury, Kini, Natarajan 2024 (rDPO, Sec. 3): de-biased under a flip rate eps, so that its expectation
        # over noisy labels equals the clean DPO loss; equals eq. 7 at eps = 0.
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        # Azar et al. 2023 (IPO), eq. 17: regress h onto 1 / (2 tau), with tau = beta.
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        # SLiC-HF (Zhao et al. 2023) calibration loss with the reference ratio (Liu et al. 2023, RSO): relu(1 - beta h).
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


@dataclass(kw_only=True)
class DPOConfig(OptimConfig, LoraConfig):
    model: str = opt(
        "", "policy to start from: a run folder (sft/pretrain), a HF model directory, a .gguf or 'smollm2'"
    )
    ref_model: str = opt("", "the frozen reference (default: the same as --model)")
    data: str = opt(
        "", "comparison JSONL ({prompt, chosen, rejected, tie?}), or 'world' for simulated votes on world pairs"
    )
    loss_type: str = opt("sigmoid", "sigmoid (DPO), ipo, hinge (SLiC/RSO) or robust (rDPO)")
    beta: float = opt(0.1, "strength of the KL regularisation toward the reference (IPO's tau)")
    label_smoothing: float = opt(0.0, "assumed label-flip rate eps for sigmoid (cDPO) and robust (rDPO), in [0, 0.5)")
    length_normalize: bool = opt(False, "divide each completion's summed log-prob by its length in tokens")
    rpo_alpha: float = opt(0.0, "weight of the chosen responses' per-token NLL added to the loss (RPO; 0: off)")
    precompute_ref: bool = opt(True, "compute reference log-probs once over the dataset, then free the reference")
    lr: float = opt(
        1e-4, "peak learning rate (AdamW); 1e-4 for the tiny world model (5e-4 lengthened its samples), ~5e-7 for 135M"
    )
    warmup: float = opt(0.1, "share of the budget spent warming the learning rate up")
    batch_size: int = opt(32, "pairs per optimiser step")
    group_by_length: bool = opt(
        False, "batches of pairs of like lengths (each run of 50 batches sorted by length): less padding, same epoch"
    )
    micro_batch_size: int = opt(
        0, "pairs per forward (0: batch_size); batch_size / micro_batch_size = accumulation steps"
    )
    epochs: float = opt(1.0, "passes over the training pairs")
    max_prompt_length: int = opt(128, "prompt tokens kept (the end of the prompt)")
    max_completion_length: int = opt(64, "completion tokens kept (the start of each completion)")
    held_out: float = opt(0.1, "share of pairs held out for evaluation (none with --eval-data)")
    eval_data: str = opt("", "held-out preference JSONL (default: a held_out share of --data); every --data row trains")
    split_by: str = opt("row", SPLIT_BY_HELP)
    eval_every: int = opt(50, "evaluate on the held-out pairs every N steps (and at the end)")
    log_every: int = opt(10, "log training metrics (means over the interval) every N steps")
    world_pairs: int = opt(3000, "with --data world: candidate pairs drawn from the world's writers")
    world_length_bias: float = opt(0.0, "with --data world: the annotators' planted length bias (logit per word)")

    def __post_init__(self):
        super().__post_init__()
        check(self.loss_type in LOSS_TYPES, f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        check(self.beta > 0, f"beta must be > 0, got {self.beta}")
        check(0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        check(
            self.label_smoothing == 0 or self.loss_type in ("sigmoid", "robust"),
            f"label_smoothing applies to sigmoid and robust only, got {self.label_smoothing} with {self.loss_type!r}",
        )
        check(self.rpo_alpha >= 0, f"rpo_alpha must be >= 0, got {self.rpo_alpha}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        self.micro_batch_size = self.micro_batch_size or self.batch_size
        check(
            self.batch_size % self.micro_batch_size == 0,
            f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})",
        )
        check(
            self.epochs > 0 or self.max_steps > 0 or self.max_seconds > 0,
            f"give epochs, max_steps or max_seconds, got {self.epochs}, {self.max_steps}, {self.max_seconds}",
        )
        check(0 <= self.held_out < 0.5, f"held_out must be in [0, 0.5), got {self.held_out}")
        check(self.split_by in SPLIT_BY, f"split_by must be one of {SPLIT_BY}, got {self.split_by!r}")

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size


# ---- the pieces the loop is made of -----------------------------------------------------------------------


def pair_logps(model, batch: dict, length_normalize: bool = False, with_token_mean: bool = False):
    """(chosen [B], rejected [B]) summed (or per-token mean) log-probs from ONE pass over the 2B rows
    (each pair's prompt run once for both: `preflab.logps.shared_prompt_forward`).

    With `with_token_mean`, also the chosen responses' mean log-prob per token [B] (for the RPO term).
    """
    _, summed = sequence_logps(model, batch)
    token_mean = summed / batch["completion_mask"].sum(-1).clamp(min=1)
    B = summed.shape[0] // 2
    logps = token_mean if length_normalize else summed
    if with_token_mean:
        return logps[:B], logps[B:], token_mean[:B]
    return logps[:B], logps[B:]


@torch.no_grad()
def reference_logps(
    ref_model, pairs: list, pad_id: int, batch_size: int, length_normalize: bool = False
) -> torch.Tensor:
    """[N, 2] reference log-probs (chosen, rejected) of every pair, in the pairs' order."""
    ref_model.eval()
    out = []
    device = ref_model.device  # (a base with its adapter off has no parameters of its own)
    for start in progress(range(0, len(pairs), batch_size), desc="dpo: reference log-probs"):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[start : start + batch_size], pad_id).items()}
        chosen, rejected = pair_logps(ref_model, batch, length_normalize)
        out.append(torch.stack([chosen, rejected], -1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def batch_loss(model, batch: dict, ref: torch.Tensor, config: DPOConfig):
    """Mean DPO loss of one micro-batch and its metrics; `ref` is [B, 2] reference log-probs."""
    chosen, rejected, chosen_token_mean = pair_logps(model, batch, config.length_normalize, with_token_mean=True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, ref[:, 0], ref[:, 1], config.beta, config.loss_type, config.label_smoothing
    )
    loss = losses.mean()
    if config.rpo_alpha:
        # RPO (Pang et al. 2024, eq. 1): + alpha * NLL of the chosen response per token, so that DPO cannot buy
        # its margin by lowering the chosen response's likelihood too (likelihood displacement).
        nll = -chosen_token_mean.mean()
        loss = loss + config.rpo_alpha * nll
    metrics = {
        "loss": losses.detach().mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "logps/chosen": chosen.detach().mean().item(),
        "logps/rejected": rejected.detach().mean().item(),
    }
    if config.rpo_alpha:
        metrics["nll_loss"] = nll.item()
    return loss, metrics


class Reference:
    """Reference log-probs of pair i: a precomputed table, or the reference model scoring the batch on the fly."""

    def __init__(
        self, table: torch.Tensor | None = None, model=None, length_normalize: bool = False, dtype: str = "fp32"
    ):
        self.table, self.model, self.length_normalize, self.dtype = table, model, length_normalize, dtype

    def __call__(self, indices: list[int], batch: dict) -> torch.Tensor:
        if self.table is not None:
            return self.table[indices].to(batch["input_ids"].device)
        with torch.no_grad(), autocast(self.dtype, batch["input_ids"].device):  # the policy's precision
            return torch.stack(pair_logps(self.model, batch, self.length_normalize), -1)


def accumulate_gradients(
    model, pairs: list, indices: list[int], reference: Reference, pad_id: int, config: DPOConfig, accelerator=None
) -> dict:
    """Backward over `indices` in micro-batches, each loss divided by the number of micro-batches, so the
    gradient is that of the mean loss over all the pairs (4 x 1 == 1 x 4). Returns the mean metrics. With
    several processes each takes every world-th micro-batch and scales its loss by the world size (DDP
    averages the processes' gradients): the same step as one process taking them all."""
    world = accelerator.num_processes if accelerator else 1
    device = next(model.parameters()).device
    chunks = [indices[i : i + config.micro_batch_size] for i in range(0, len(indices), config.micro_batch_size)]
    mine = shard(chunks, accelerator)
    totals: dict[str, float] = {}
    for n, chunk in enumerate(mine):
        batch = {k: v.to(device) for k, v in collate_pairs([pairs[i] for i in chunk], pad_id).items()}
        with sync_on_last(accelerator, model, n, len(mine)):
            loss, metrics = batch_loss(model, batch, reference(chunk, batch), config)
            scaled = loss / len(chunks) * world
            if accelerator is not None:
                accelerator.backward(scaled)
            else:
                scaled.backward()
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value / len(chunks)
    if not mine:
        join_without_data(accelerator, model)
    if world > 1:  # the step's metrics over every process's micro-batches
        keys = sorted(totals)
        summed = accelerator.reduce(torch.tensor([totals[k] for k in keys], device=device), "sum")
        totals = dict(zip(keys, summed.tolist()))
    return totals


@torch.no_grad()
def evaluate_pairs(model, pairs: list, reference: Reference, pad_id: int, config: DPOConfig) -> dict:
    """Mean held-out metrics (weighted by batch size)."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    device = next(model.parameters()).device
    for start in range(0, len(pairs), config.micro_batch_size):
        chunk = list(range(start, min(len(pairs), start + config.micro_batch_size)))
        batch = {k: v.to(device) for k, v in collate_pairs([pairs[i] for i in chunk], pad_id).items()}
        _, metrics = batch_loss(model, batch, reference(chunk, batch), config)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value * len(chunk) / len(pairs)
    model.train(was_training)
    return totals


# ---- data ---------------------------------------------------------------------------------------------------


def load_rows(config: DPOConfig) -> list:
    """Preference rows from the file, or simulated votes on world pairs (`--data world`)."""
    if config.data == "world":
        from preflab.data.preferences import parse_preference
        from preflab.world.annotators import annotator_pool, simulate_votes, world_pairs

        pool = annotator_pool(8, seed=config.seed, length_bias=config.world_length_bias)
        votes = simulate_votes(world_pairs(config.world_pairs, seed=config.seed), pool, seed=config.seed)
        return [parse_preference(v, f"world:{i + 1}") for i, v in enumerate(votes)]
    if not config.data:
        raise DataError("--data", "no comparison file given", "pass --data FILE.jsonl (or --data world)")
    return list(load_preferences(config.data).rows)


# ---- the trainer -------------------------------------------------------------------------------------------


def train_dpo(
    model, tokenizer, rows: list, config: DPOConfig, ref_model=None, run: Run | None = None, eval_rows=None
) -> dict:
    """Train `model` in place on preference rows; the function the demo calls. Returns the summary numbers.

    `ref_model` is the frozen reference (a copy of the starting policy when None). `eval_rows`: the held-out
    rows (every row of `rows` then trains); None: a `held_out` share of `rows`.
    """
    accelerator = make_accelerator(dtype=config.dtype)
    pad_id = tokenizer.pad_token_id
    log = run.log if run is not None else (lambda step, metrics: None)

    # 1. ties out (counted), held-out split, tokens
    n_ties = sum(bool(r.tie) for r in rows)
    rows = [r for r in rows if not r.tie]
    if eval_rows is None:
        train_rows, eval_rows = split_rows(rows, config.held_out, config.seed, config.split_by)
    else:
        train_rows, eval_rows = rows, [r for r in eval_rows if not r.tie]
    train_pairs, n_trunc = tokenize_rows(tokenizer, train_rows, config.max_prompt_length, config.max_completion_length)
    eval_pairs, n_trunc_eval = tokenize_rows(
        tokenizer, eval_rows, config.max_prompt_length, config.max_completion_length
    )
    if len(train_pairs) < config.batch_size:
        raise DataError(
            config.data or "rows",
            f"{len(train_pairs)} training pairs (after {n_ties} ties and the held-out "
            f"split) are fewer than one batch of {config.batch_size}",
            "lower --batch-size or give more pairs",
        )

    # 2. the reference: precomputed once (then freed) or kept for on-the-fly scoring
    ref_model = ref_model if ref_model is not None else reference_of(model)  # LoRA: the base, adapter off
    ref_model.to(accelerator.device).eval()
    for p in ref_model.parameters():
        p.requires_grad_(False)
    if config.precompute_ref:
        with autocast(config.dtype, accelerator.device):  # the policy's precision, so step 0's ratio is 1
            train_ref = Reference(
                reference_logps(ref_model, train_pairs, pad_id, config.micro_batch_size, config.length_normalize)
            )
            eval_ref = Reference(
                reference_logps(ref_model, eval_pairs, pad_id, config.micro_batch_size, config.length_normalize)
            )
        del ref_model
    else:
        train_ref = eval_ref = Reference(model=ref_model, length_normalize=config.length_normalize, dtype=config.dtype)

    # 3. optimiser and budget
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    steps_per_epoch = len(train_pairs) // config.batch_size
    planned = max(1, int(config.epochs * steps_per_epoch)) if config.epochs > 0 else 0
    max_steps = min(s for s in (planned, config.max_steps) if s > 0) if (planned or config.max_steps) else 0
    rng = random.Random(config.seed)
    order: list[int] = []
    step, interval, last_eval, metrics, elapsed = 0, {}, {}, {}, 0.0
    ckpt = run.resume_state() if run is not None else None
    if ckpt is not None:
        ckpt.load_model_weights(accelerator.unwrap_model(model))
        optimizer.load_state_dict(ckpt.state["optimizer"])
        rng.setstate(ckpt.state["rng_order"])
        order, step, interval, last_eval, metrics, elapsed = ckpt.state["loop"]
    budget = Budget(max_steps, config.max_seconds, elapsed=elapsed)

    def save() -> None:
        run.save_checkpoint(
            step,
            accelerator.unwrap_model(model),
            tokenizer,
            {
                "optimizer": optimizer.state_dict(),
                "rng_order": rng.getstate(),
                "loop": (order, step, interval, last_eval, metrics, budget.elapsed),
            },
        )

    bar = progress(total=max_steps or None, initial=step, desc=f"dpo ({config.loss_type})")

    # 4. the loop: one optimiser step per batch of pairs, accumulated over micro-batches
    with run.guarded() if run is not None else contextlib.nullcontext() as stop:
        while not budget.done(step):
            if len(order) < config.batch_size:  # a new epoch: reshuffle, drop the incomplete tail
                order = list(range(len(train_pairs)))
                rng.shuffle(order)
                if config.group_by_length:
                    order = length_grouped(order, config.batch_size, rng, lambda i: pair_length(train_pairs[i]))
            indices, order = order[: config.batch_size], order[config.batch_size :]
            lr = config.lr * lr_factor(budget.progress(step), config.warmup)
            set_lr(optimizer, lr)
            metrics = accumulate_gradients(model, train_pairs, indices, train_ref, pad_id, config, accelerator)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf"))
            check_finite(step + 1, **{"dpo/loss": metrics["loss"], "dpo/grad_norm": grad_norm})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            metrics["grad_norm"], metrics["lr"] = float(grad_norm), lr
            for key, value in metrics.items():
                interval.setdefault(key, []).append(value)
            if step % config.log_every == 0 or step == 1:
                means = {f"dpo/{k}": sum(v) / len(v) for k, v in interval.items()}
                log(step, means)
                bar.set_postfix(loss=f"{means['dpo/loss']:.3f}", acc=f"{means['dpo/rewards/accuracies']:.2f}")
                interval = {}
            # 5. held-out evaluation
            if eval_pairs and config.eval_every and step % config.eval_every == 0:
                last_eval = evaluate_pairs(model, eval_pairs, eval_ref, pad_id, config)
                log(step, {f"dpo/eval/{k}": v for k, v in last_eval.items()})
            if run is not None:
                run.step_end(step, config.checkpoint_every, stop, save)
    bar.close()
    if eval_pairs and (not config.eval_every or step % config.eval_every):
        last_eval = evaluate_pairs(model, eval_pairs, eval_ref, pad_id, config)
        log(step, {f"dpo/eval/{k}": v for k, v in last_eval.items()})
    accelerator.unwrap_model(model).eval()
    return {
        "steps": step,
        "epochs": step * config.batch_size / max(len(train_pairs), 1),
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "ties_skipped": n_ties,
        "truncated": n_trunc + n_trunc_eval,
        "train_loss": metrics.get("loss", float("nan")),
        "eval_loss": last_eval.get("loss", float("nan")),
        "eval_accuracy": last_eval.get("rewards/accuracies", float("nan")),
        "eval_margin": last_eval.get("rewards/margins", float("nan")),
        "seconds_training": budget.elapsed,
    }


@stage(DPOConfig)
def dpo(config: DPOConfig) -> dict:
    from preflab.models import load_model

    set_threads(config.threads)
    seed_everything(config.seed)
    check(bool(config.model), "give --model (a run folder, a model directory, a .gguf or 'smollm2')")
    run = Run(config.out or None, "dpo", config)
    if config.resume and run.finished_summary():
        print(f"[dpo] {run.dir} has already finished; nothing to resume", flush=True)
        return run.finished_summary()

    model, tokenizer = load_model(config.model)
    model = add_lora(model, config, base=config.model)  # --lora-r: only the adapters train
    ref_model = load_model(config.ref_model, tokenizer=tokenizer)[0] if config.ref_model else None
    rows = load_rows(config)
    eval_rows = list(load_preferences(config.eval_data).rows) if config.eval_data else None
    print(f"[dpo] {len(rows)} comparisons, loss {config.loss_type}, beta {config.beta}", flush=True)
    summary = train_dpo(model, tokenizer, rows, config, ref_model=ref_model, run=run, eval_rows=eval_rows)
    # 6. save the policy (`preflab eval policy` measures what it does)
    run.save_model(model, tokenizer)
    summary["model"] = str(run.model_dir)
    return run.finish(summary)
