"""`preflab reward`: train a Bradley-Terry reward model (or an ensemble of them) on comparisons.

    1. read the comparisons; split off a reproducible held-out share (or read --eval-data); tokenise in token
       space (prompt ids + chosen ids + rejected ids), truncating prompts at the start and completions at the end
    2. for each ensemble member k (seed + k: its own head init and data order):
       a. load the backbone (a causal LM) and put a scalar head on it (`RewardModel`)
       b. one epoch by default, AdamW, learning rate warmed up then annealed to 0 (RLHF detail 8)
       c. each optimiser step: `gradient_accumulation` micro-batches of `batch_size` pairs, chosen and rejected
          in one forward pass, loss = Bradley-Terry (InstructGPT eq. 1) averaged over all pairs of the step
       d. normalise: gain and bias so that reference responses (the training pairs' chosen + rejected, or
          --reference) score mean 0 and std 1 (RLHF detail 7)
       e. score the held-out pairs, save the member, free it
    3. write the ensemble index (`ensemble.json` + `member-k/`), the held-out report (accuracy, calibration,
       length-bias probe beside the length-only baselines, as `preflab eval reward` writes it) and the summary

Ensembles use separate backbones: each member fine-tunes its own copy. Members that share a fine-tuned
backbone and differ only in the head are nearly identical in what they know, so their disagreement says
little about where the reward is uncertain (Coste et al. 2023 train whole separate models). The cost is K
times the training time and, at scoring time, K forward passes.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

import torch

from preflab.adapters import add_lora, is_adapted
from preflab.config import ConfigError, LoraConfig, OptimConfig, check, opt
from preflab.data import (
    DataError,
    collate_pairs,
    load_demonstrations,
    load_preferences,
    pair_length,
    split_rows,
    tokenize_rows,
)
from preflab.data.preferences import SPLIT_BY, SPLIT_BY_HELP
from preflab.data.tokenize import encode_completion, encode_prompt, truncate
from preflab.models import describe, load_model
from preflab.reward.evaluate import calibration, report_from_scores, save_report, score_pairs
from preflab.reward.loss import bradley_terry_loss, pair_statistics, summarise
from preflab.reward.model import REDUCTIONS, RewardModel, write_ensemble_index
from preflab.runs import Run, progress, seed_everything
from preflab.stages import stage
from preflab.training import (
    Budget,
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
from preflab.world import KINDS, kind_of


@dataclass(kw_only=True)
class RewardConfig(OptimConfig, LoraConfig):
    model: str = opt("", "backbone: a Hugging Face causal-LM directory, a run folder, a .gguf file or 'smollm2'")
    data: str = opt("", "preference JSONL (prompt/chosen/rejected, optional margin, tie, subset)")
    eval_data: str = opt("", "held-out preference JSONL (default: a held_out share of --data)")
    held_out: float = opt(0.1, "share of --data held out when no --eval-data is given (0: no held-out set)")
    split_seed: int = opt(0, "seed of the train/held-out split: the same seed and file give the same split")
    split_by: str = opt("row", SPLIT_BY_HELP)
    max_rows: int = opt(0, "train on the first N training rows only (0: all); the held-out set is unchanged")
    exclude_kind: str = opt(
        "",
        "drop the rows whose prompt is a tutoring-world question of this kind (capital, add or unknown) from the "
        "training and held-out rows, so the reward model never sees it (`preflab eval shift --left-out` measures it)",
    )
    max_eval_rows: int = opt(0, "score the first N held-out rows only (0: all)")
    epochs: int = opt(1, "passes over the training pairs (1 is the published recipe: more overfits)")
    lr: float = opt(1e-4, "peak learning rate (AdamW), annealed to 0")
    warmup: float = opt(0.05, "share of training spent warming the learning rate up")
    batch_size: int = opt(8, "pairs per micro-batch (each pair is two sequences)")
    gradient_accumulation: int = opt(1, "micro-batches per optimiser step")
    group_by_length: bool = opt(
        False, "batches of pairs of like lengths (each run of 50 batches sorted by length): less padding, same epoch"
    )
    use_margin: bool = opt(True, "use the data's `margin` column (Llama 2 margin loss) where rows give one")
    margin_scale: float = opt(1.0, "multiply the data's margins by this")
    label_smoothing: float = opt(0.0, "target P(chosen wins) = 1 - label_smoothing (robust to flipped labels)")
    max_prompt_length: int = opt(192, "prompt tokens kept (the end of the prompt); 0: all")
    max_completion_length: int = opt(64, "completion tokens kept (the start of the response); 0: all")
    train_layers: int = opt(
        -1,
        "train only the top N transformer layers, the final norm and the head (-1: all; "
        "a CPU budget option for large backbones: the frozen layers need no backward pass)",
    )
    max_steps: int = opt(0, "stop each member after this many optimiser steps (0: the epochs decide)")
    ensemble: int = opt(1, "members to train (different seeds and data orders; separate backbones)")
    reduce: str = opt("mean", "how an ensemble combines members: mean, min or mean_minus_std")
    reference: str = opt(
        "",
        "responses for normalisation, a demonstration JSONL (prompt + completion); "
        "default: the training pairs' chosen and rejected responses",
    )
    reference_rows: int = opt(512, "at most this many reference pairs/rows for normalisation")
    eval_batch_size: int = opt(32, "sequences per scoring batch")
    eval_every: int = opt(0, "score the held-out set every N steps (0: only at the end)")
    log_every: int = opt(10, "log training metrics (means over the interval) every N steps")
    seed: int = opt(0, "random seed; member k uses seed + k")

    def __post_init__(self):
        super().__post_init__()
        check(bool(self.model), "give --model (a backbone: directory, run folder, .gguf or 'smollm2')")
        check(bool(self.data), "give --data (a preference JSONL file)")
        check(0 <= self.held_out < 1, f"held_out must be in [0, 1), got {self.held_out}")
        check(self.split_by in SPLIT_BY, f"split_by must be one of {SPLIT_BY}, got {self.split_by!r}")
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(0 <= self.warmup < 1, f"warmup must be in [0, 1), got {self.warmup}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.gradient_accumulation >= 1, f"gradient_accumulation must be >= 1, got {self.gradient_accumulation}")
        check(0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        check(
            self.max_prompt_length >= 0 and self.max_completion_length >= 0,
            f"max lengths must be >= 0, got {self.max_prompt_length} and {self.max_completion_length}",
        )
        check(self.train_layers >= -1, f"train_layers must be >= -1, got {self.train_layers}")
        check(self.ensemble >= 1, f"ensemble must be >= 1, got {self.ensemble}")
        check(self.reduce in REDUCTIONS, f"reduce must be one of {REDUCTIONS}, got {self.reduce!r}")
        check(
            self.lora_r == 0 or self.train_layers == -1,
            f"give --lora-r or --train-layers, not both (got {self.lora_r} and {self.train_layers})",
        )
        check(self.reference_rows >= 1, f"reference_rows must be >= 1, got {self.reference_rows}")
        check(
            self.exclude_kind in ("",) + KINDS,
            f"exclude_kind must be one of {KINDS} (the world's question kinds), got {self.exclude_kind!r}",
        )


def freeze_lower_layers(model: RewardModel, n: int) -> None:
    """Leave only the top `n` decoder layers, the final norm and the head trainable (n = -1: everything)."""
    if n < 0:
        return
    decoder = model.backbone.get_decoder()
    layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    if layers is None or norm is None:
        raise ConfigError(f"train_layers {n}: {type(decoder).__name__} has no `layers`/`norm` to freeze below; use -1")
    model.backbone.requires_grad_(False)
    for module in list(layers)[len(layers) - n :] + [norm]:
        module.requires_grad_(True)


def train_step(
    model: RewardModel,
    optimizer,
    pairs: list,
    micro_batch_size: int,
    config: RewardConfig,
    accelerator=None,
    step: int = 0,
) -> tuple[float, dict]:
    """One optimiser step over `pairs` in micro-batches; returns (sum of per-pair losses, pair statistics).

    Each micro-batch's mean loss is weighted by its share of the step's pairs, so the accumulated gradient is
    that of the mean loss over all `pairs`: batch 4 x accumulation 1 equals batch 1 x accumulation 4. With
    several processes (torchrun / accelerate launch) each takes every world-th pair and the loss is scaled by
    the world size, since DDP averages the processes' gradients: the same step as one process taking them all.
    """
    world = accelerator.num_processes if accelerator else 1
    inner = accelerator.unwrap_model(model) if accelerator else model
    pad, device = inner.tokenizer.pad_token_id, inner.device
    loss_sum, sums = torch.zeros((), device=device), {}
    mine = shard(pairs, accelerator)
    micros = [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    for i, micro in enumerate(micros):
        batch = {k: v.to(device) for k, v in collate_pairs(micro, pad).items()}  # B chosen rows, then B rejected
        with sync_on_last(accelerator, model, i, len(micros)):
            rewards = model(
                batch["input_ids"], batch["attention_mask"], normalise=False, prompt_length=int(batch["prompt_length"])
            )
            chosen, rejected = rewards[: len(micro)], rewards[len(micro) :]
            margin = batch["margin"] * config.margin_scale if config.use_margin else None
            loss = bradley_terry_loss(chosen, rejected, margin, config.label_smoothing, batch["tie"])
            weighted = loss * len(micro) / len(pairs) * world
            if accelerator is not None:
                accelerator.backward(weighted)
            else:
                weighted.backward()
        loss_sum += loss.detach() * len(micro)
        for key, value in pair_statistics(chosen.detach(), rejected.detach(), batch["tie"]).items():
            sums[key] = sums.get(key, 0.0) + value
    if not micros:
        join_without_data(accelerator, model)
    if accelerator is not None and world > 1:  # the step's statistics over every process's pairs
        keys = sorted(sums)
        totals = accelerator.reduce(torch.tensor([float(loss_sum)] + [sums[k] for k in keys], device=device), "sum")
        loss_sum, sums = totals[0], dict(zip(keys, totals[1:].tolist()))
    loss_sum = float(loss_sum)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf"))
    check_finite(step, **{"reward/loss": loss_sum, "reward/grad_norm": grad_norm})  # before it reaches the weights
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, sums


def held_out_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, tie: torch.Tensor, config: RewardConfig, prefix: str = "reward/eval"
) -> dict:
    """Held-out loss, accuracy, margin, chosen, rejected and ECE from raw (Bradley-Terry scale) rewards [N]."""
    losses = sum(
        bradley_terry_loss(chosen[i : i + 1], rejected[i : i + 1], None, config.label_smoothing, tie[i : i + 1]).item()
        for i in range(len(chosen))
    )
    metrics = summarise(pair_statistics(chosen, rejected, tie), losses, prefix)
    _, metrics[f"{prefix}/ece"] = calibration(torch.sigmoid(chosen - rejected)[~tie].numpy())
    return metrics


def reference_ids(config: RewardConfig, tokenizer, train_pairs: list) -> tuple[list, list, str]:
    """Prompt ids and completion ids of the responses whose rewards are normalised to mean 0, std 1."""
    if config.reference:
        rows = load_demonstrations(config.reference).rows[: config.reference_rows]
        prompts, completions = [], []
        for row in rows:
            p, c, _ = truncate(
                encode_prompt(tokenizer, row.prompt),
                encode_completion(tokenizer, row.completion),
                config.max_prompt_length,
                config.max_completion_length,
            )
            prompts.append(p)
            completions.append(c)
        return prompts, completions, config.reference
    pairs = train_pairs[: config.reference_rows]
    return (
        [p.prompt_ids for p in pairs] * 2,
        [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
        f"{len(pairs)} training pairs (chosen + rejected)",
    )


def step_batches(pairs: list, pairs_per_step: int, rng: random.Random, group_by_length: bool = False):
    """Endless optimiser-step batches: each epoch the pairs in a fresh order of this member's own; with
    `group_by_length`, batches of like lengths (`training.length_grouped`: on the demo's votes 85% of the padded
    tokens are real, against 55% in random batches)."""
    while True:
        epoch_pairs = pairs[:]
        rng.shuffle(epoch_pairs)
        if group_by_length:
            epoch_pairs = length_grouped(epoch_pairs, pairs_per_step, rng, pair_length)
        for start in range(0, len(epoch_pairs), pairs_per_step):
            yield epoch_pairs[start : start + pairs_per_step]


def train_member(
    config: RewardConfig,
    k: int,
    train_pairs: list,
    eval_pairs: list,
    run: Run,
    step0: int,
    loaded: tuple | None = None,
    ckpt=None,
    progress_so_far: dict | None = None,
):
    """Steps 2a-2d for member k (on `loaded` = (backbone, tokenizer) if given, from `ckpt` when resuming);
    returns (model, last global step, final training metrics). `progress_so_far` (the members already done)
    goes into this member's checkpoints."""
    seed = config.seed + k
    seed_everything(seed)
    # a. backbone + head
    backbone, tokenizer = loaded or load_model(config.model)
    model = RewardModel(
        backbone,
        tokenizer,
        seed=seed,
        max_prompt_length=config.max_prompt_length,
        max_completion_length=config.max_completion_length,
        batch_size=config.eval_batch_size,
    )
    freeze_lower_layers(model, config.train_layers)
    model.backbone = add_lora(model.backbone, config, base=config.model)  # --lora-r: adapters + the head train
    accelerator = make_accelerator(dtype=config.dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    # b. schedule: one epoch by default, lr annealed to 0
    pairs_per_step = config.batch_size * config.gradient_accumulation
    steps_per_epoch = math.ceil(len(train_pairs) / pairs_per_step)
    total = config.epochs * steps_per_epoch
    batches = step_batches(train_pairs, pairs_per_step, random.Random(seed), config.group_by_length)
    step, interval, loss_sum, last, elapsed = 0, {}, 0.0, {}, 0.0
    if ckpt is not None:
        unwrapped = accelerator.unwrap_model(model)
        ckpt.load_model_weights(unwrapped.backbone)
        unwrapped.head.load_state_dict(ckpt.state["head"])
        optimizer.load_state_dict(ckpt.state["optimizer"])
        step, interval, loss_sum, last, elapsed = ckpt.state["loop"]
        for _ in range(step):  # the data position, replayed without compute
            next(batches)
    budget = Budget(min(config.max_steps or total, total), config.max_seconds, elapsed=elapsed)

    def save() -> None:
        unwrapped = accelerator.unwrap_model(model)
        run.save_checkpoint(
            step0 + step,
            unwrapped.backbone,
            unwrapped.tokenizer,
            {
                "member": k,
                "head": unwrapped.head.state_dict(),
                "optimizer": optimizer.state_dict(),
                "loop": (step, interval, loss_sum, last, budget.elapsed),
                "members_done": progress_so_far or {},
            },
        )

    bar = progress(total=budget.max_steps, initial=step, desc=f"reward member {k}" if config.ensemble > 1 else "reward")
    with run.guarded() as stop:
        while not budget.done(step):
            lr = config.lr * lr_factor(budget.progress(step), config.warmup, floor=0.0)
            set_lr(optimizer, lr)
            # c. one optimiser step over gradient_accumulation micro-batches
            step_loss, sums = train_step(
                model,
                optimizer,
                next(batches),
                config.batch_size,
                config,
                accelerator=accelerator,
                step=step0 + step + 1,
            )
            step += 1
            bar.update(1)
            loss_sum += step_loss
            for key, value in sums.items():
                interval[key] = interval.get(key, 0.0) + value
            if step % config.log_every == 0 or budget.done(step):
                last = summarise(interval, loss_sum, "reward")
                run.log(step0 + step, {**last, "reward/lr": lr, "reward/member": k})
                bar.set_postfix(loss=f"{last['reward/loss']:.3f}", acc=f"{last['reward/accuracy']:.2f}")
                interval, loss_sum = {}, 0.0
            if config.eval_every and eval_pairs and step % config.eval_every == 0:
                raw_w, raw_l = score_pairs(model, eval_pairs, config.eval_batch_size)
                run.log(step0 + step, held_out_metrics(raw_w[0], raw_l[0], ties(eval_pairs), config))
                model.train()
            run.step_end(step, config.checkpoint_every, stop, save)
    bar.close()
    model = accelerator.unwrap_model(model).eval()
    if is_adapted(model.backbone):  # a reward model is scored, never trained further: fold the adapter in
        model.backbone = model.backbone.merge_and_unload()
    # d. normalisation on reference responses
    prompts, completions, source = reference_ids(config, model.tokenizer, train_pairs)
    model.set_normalisation(model.score_ids(prompts, completions, normalise=False), source)
    return model, step0 + step, last


def ties(pairs: list) -> torch.Tensor:
    return torch.tensor([bool(p.tie) for p in pairs], dtype=torch.bool)


def drop_kind(rows: list, kind: str, path: str) -> tuple[list, int]:
    """(rows whose prompt is not a world question of `kind`, how many were dropped); `kind` "" keeps all.
    A file with no world question at all is refused: the option would silently do nothing."""
    if not kind:
        return rows, 0
    kinds = [kind_of(r.prompt) for r in rows]
    if rows and all(k is None for k in kinds):
        raise DataError(path, f"exclude_kind {kind!r}: no row's prompt is a tutoring-world question", "drop the option")
    kept = [r for r, k in zip(rows, kinds) if k != kind]
    return kept, len(rows) - len(kept)


def load_pairs(config: RewardConfig, tokenizer) -> tuple[list, list, list, int, int]:
    """Step 1: (train pairs, held-out pairs, held-out rows, truncated train pairs, truncated held-out pairs)."""
    rows = load_preferences(config.data).rows
    if config.eval_data:
        train_rows, eval_rows = rows, load_preferences(config.eval_data).rows
    else:
        train_rows, eval_rows = split_rows(rows, config.held_out, config.split_seed, config.split_by)
    # (after the split, so the split is the same with or without the option)
    train_rows, n_train = drop_kind(train_rows, config.exclude_kind, config.data)
    eval_rows, n_eval = drop_kind(eval_rows, config.exclude_kind, config.eval_data or config.data)
    if config.exclude_kind:
        print(
            f"[reward] exclude_kind {config.exclude_kind}: dropped {n_train} training + {n_eval} held-out rows",
            flush=True,
        )
    train_rows = train_rows[: config.max_rows] if config.max_rows else train_rows
    eval_rows = eval_rows[: config.max_eval_rows] if config.max_eval_rows else eval_rows
    if not train_rows:
        raise DataError(config.data, f"no training rows left after holding out {config.held_out}", "lower --held-out")
    train, t1 = tokenize_rows(tokenizer, train_rows, config.max_prompt_length, config.max_completion_length)
    held, t2 = tokenize_rows(tokenizer, eval_rows, config.max_prompt_length, config.max_completion_length)
    return train, held, eval_rows, t1, t2


@stage(RewardConfig)
def train_reward(config: RewardConfig) -> dict:
    set_threads(config.threads)
    # 1. the backbone (a clear error if it is not a causal LM) and the data, tokenised with its tokenizer
    first = load_model(config.model)
    tokenizer = first[1]
    train_pairs, eval_pairs, eval_rows, truncated_train, truncated_eval = load_pairs(config, tokenizer)
    run = Run(config.out or None, "reward", config)
    if config.resume and run.finished_summary():
        print(f"[reward] {run.dir} has already finished; nothing to resume", flush=True)
        return run.finished_summary()
    ckpt = run.resume_state()
    print(
        f"[reward] {len(train_pairs)} training pairs, {len(eval_pairs)} held out, "
        f"{truncated_train} + {truncated_eval} truncated; "
        f"{config.ensemble} member(s)",
        flush=True,
    )
    # 2. members, trained one at a time (only one backbone in memory)
    done = ckpt.state["members_done"] if ckpt else {}
    step, names, member_summaries = done.get("step", 0), done.get("names", []), done.get("summaries", [])
    raw_w, raw_l, gains, biases = (done.get(key, []) for key in ("raw_w", "raw_l", "gains", "biases"))
    for k in range(len(names), config.ensemble):
        so_far = {
            "step": step,
            "names": names,
            "summaries": member_summaries,
            "raw_w": raw_w,
            "raw_l": raw_l,
            "gains": gains,
            "biases": biases,
        }
        resume_here = ckpt if ckpt is not None and ckpt.state["member"] == k else None
        model, step, last = train_member(
            config, k, train_pairs, eval_pairs, run, step, first if k == 0 else None, resume_here, so_far
        )
        first = None
        if k == 0:
            print(f"[reward] backbone {describe(model.backbone)}", flush=True)
        summary = {
            "member": k,
            "train_loss": last.get("reward/loss"),
            "train_accuracy": last.get("reward/accuracy"),
            "gain": model.gain.item(),
            "bias": model.bias.item(),
            "normalisation": model.normalisation,
        }
        if eval_pairs:  # e. held-out scores of this member, kept for the report
            w, lo = score_pairs(model, eval_pairs, config.eval_batch_size)
            metrics = held_out_metrics(w[0], lo[0], ties(eval_pairs), config)
            run.log(step, {**metrics, "reward/member": k})
            summary.update({"eval_" + name.rsplit("/", 1)[-1]: value for name, value in metrics.items()})
            raw_w.append(w[0])
            raw_l.append(lo[0])
            gains.append(model.gain.item())
            biases.append(model.bias.item())
        member_summaries.append(summary)
        names.append(f"member-{k}")
        if run.main:
            model.save(run.model_dir if config.ensemble == 1 else run.model_dir / names[-1])
        del model
    # 3. the ensemble index, the held-out report (as `preflab eval reward` writes it) and the summary
    if config.ensemble > 1 and run.main:
        write_ensemble_index(run.model_dir, names, config.reduce)
    if run.main:
        (run.dir / "members.json").write_text(json.dumps(member_summaries, indent=2) + "\n")
    out = {
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "steps": step,
        "members": config.ensemble,
        "train_loss": member_summaries[-1]["train_loss"],
        "train_accuracy": member_summaries[-1]["train_accuracy"],
    }
    if eval_pairs:
        report, per_pair = report_from_scores(
            eval_rows,
            eval_pairs,
            truncated_eval,
            tokenizer,
            torch.stack(raw_w),
            torch.stack(raw_l),
            torch.tensor(gains),
            torch.tensor(biases),
            reduce=config.reduce,
        )
        if run.main:
            save_report(run.dir, report, per_pair, f"Held-out pairs of {config.data}")
        if config.ensemble > 1:
            run.log(step, {"reward/eval/ensemble_accuracy": report["accuracy"]})
        out.update(
            eval_accuracy=report["accuracy"],
            eval_ece=report["ece"],
            longer_wins=report["longer_wins"],
            shorter_wins=report["shorter_wins"],
            spearman_reward_length=report["spearman_reward_length"],
        )
        if config.ensemble > 1:
            out["eval_accuracy_members"] = [m["eval_accuracy"] for m in member_summaries]
    out["model"] = str(run.model_dir)
    return run.finish(out)
