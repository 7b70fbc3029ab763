"""The online loop's shared room: what PPO, RLOO and GRPO (and best-of-n's scoring) do the same way.

Every online method runs the same outer loop, one rollout batch per step:

    set-up          `setup_online`: policy, frozen reference, reward, prompts, run folder  -> `OnlineSetup`
    steps 1-3       `rollout_and_score`: sample, recompute old and reference log-probs, score  -> `ScoredRollout`
    (method)        per-token rewards / advantages: PPO in `ppo.py`, RLOO and GRPO in `rloo.py`
    update          `optimise`: epochs over reshuffled minibatches, one optimiser step each (RLHF detail #16),
                    the method's own minibatch function doing the micro-batch forward/backward
    evaluation      `evaluate_policy` before and after, on held-out prompts
    finish          `finish_online`: evaluate, save the policy as a HF directory, write the summary

Only the method-specific maths lives in the method's file, so each reads like its paper's algorithm box.

Several processes (`torchrun` / `accelerate launch`, DDP): each samples, scores and computes the log-probs of
every world-th row of the step's rollout batch, drawing the same random numbers one process would draw (see
`rollout.generate`), and the rows are gathered so every process holds the step's whole batch, exactly as one
process holds it. Advantages, group baselines, whitening, the KL controller and the logged means are then the
one-process computation on every process. The update gives each process every world-th row of each minibatch,
normalised by the whole minibatch and scaled by the world size, since DDP averages the gradients: the same
optimiser step as one process. Only rank 0 writes the run folder. In one process none of this runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from preflab.adapters import add_lora, reference_of
from preflab.config import LoraConfig, OptimConfig, PrecisionConfig, check, opt
from preflab.data.tokenize import collate, encode_prompt, take
from preflab.logps import chunked_logps
from preflab.policy.kl_control import make_kl_controller
from preflab.policy.losses import KL_ESTIMATORS
from preflab.rollout import Rollout, generate
from preflab.runs import Run, seed_everything
from preflab.training import (
    Budget,
    TrainingStopped,
    autocast,
    check_finite,
    make_accelerator,
    set_threads,
    shard,
    sync_on_last,
)


@dataclass(kw_only=True)
class SamplingConfig(PrecisionConfig):
    """What every stage that samples from a policy and scores the samples shares (online RL, best-of-n)."""

    model: str = opt("", "the policy to start from: a HF directory, a run folder, a .gguf file or 'smollm2'")
    reward: str = opt(
        "", "a reward-model folder, a Python function 'module:function' f(prompt, response) -> float, or 'world'"
    )
    prompts: str = opt("world", "a JSONL file of {'prompt': ...} rows, or 'world' for the tutoring world's prompts")
    temperature: float = opt(1.0, "sampling temperature (log-probs of policy and reference use it too)")
    max_new_tokens: int = opt(32, "longest response sampled")
    missing_eos_penalty: float = opt(1.0, "subtracted from the score of a response that never emitted EOS")

    def __post_init__(self):
        super().__post_init__()
        check(bool(self.model), "give --model (a HF directory, a run folder, a .gguf file or 'smollm2')")
        check(bool(self.reward), "give --reward (a reward-model folder, 'module:function' or 'world')")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(kw_only=True)
class OnlineConfig(SamplingConfig, OptimConfig, LoraConfig):
    """Online RL (PPO, RLOO, GRPO): sampling, the optimiser, and the rollout/minibatch/epoch shape."""

    n_prompts: int = opt(1000, "training prompts drawn from the world (prompts=world)")
    eval_prompts: int = opt(
        64, "held-out prompts scored before and after training (world: the eval split; JSONL: the last rows)"
    )
    max_steps: int = opt(20, "rollout batches (steps) to train on")
    batch_size: int = opt(32, "prompts per rollout batch")
    mini_batch_size: int = opt(16, "rollout rows per optimiser step")
    micro_batch_size: int = opt(16, "rows per forward/backward (gradients accumulate over a minibatch)")
    epochs: int = opt(2, "passes over each rollout batch, reshuffled each time")
    lr: float = opt(1e-4, "learning rate (AdamW, constant)")
    beta: float = opt(0.05, "KL coefficient (initial value when adaptive)")
    kl_estimator: str = opt("k1", "per-token KL estimator to the reference: k1 (log-ratio) or k3 (low variance, >= 0)")
    target_kl: float = opt(0.0, "adaptive KL controller target, nats per sequence (0: beta stays fixed)")
    horizon: int = opt(10000, "adaptive KL controller horizon (Ziegler et al.: 10000)")
    cliprange: float = opt(0.2, "PPO ratio clip epsilon")
    log_every: int = opt(1, "log metrics every N steps")
    max_kl: float = opt(
        0.0, "stop the run when the batch's mean KL to the reference (nats per sequence) exceeds this (0: no limit)"
    )
    max_abs_score: float = opt(1e4, "stop the run when a score's magnitude exceeds this (a broken reward)")
    monitor_ensemble: str = opt(
        "",
        "a reward-model ensemble folder (`preflab reward --ensemble K`) that only watches: each step it scores the "
        "samples and <stage>/ensemble/disagreement logs the mean std of its members' rewards (never trained on)",
    )

    def __post_init__(self):
        super().__post_init__()
        check(self.max_steps > 0, f"max_steps must be > 0, got {self.max_steps}")
        for name in ("batch_size", "mini_batch_size", "micro_batch_size", "epochs", "n_prompts"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(
            self.mini_batch_size % self.micro_batch_size == 0,
            f"mini_batch_size ({self.mini_batch_size}) must be a multiple of micro_batch_size "
            f"({self.micro_batch_size})",
        )
        check(
            self.kl_estimator in KL_ESTIMATORS,
            f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}",
        )
        check(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        check(self.target_kl >= 0, f"target_kl must be >= 0, got {self.target_kl}")
        check(self.horizon > 0, f"horizon must be > 0, got {self.horizon}")
        check(0 < self.cliprange < 1, f"cliprange must be in (0, 1), got {self.cliprange}")
        check(self.eval_prompts >= 0, f"eval_prompts must be >= 0, got {self.eval_prompts}")
        check(
            self.max_kl >= 0 and self.max_abs_score > 0,
            f"need max_kl >= 0 and max_abs_score > 0, got {self.max_kl} and {self.max_abs_score}",
        )


# ---- set-up ------------------------------------------------------------------------------------------------


@dataclass
class OnlineSetup:
    """Everything an online run starts from."""

    run: Run
    device: torch.device
    policy: torch.nn.Module  # trained; dropout off, pad != eos (RLHF details #1, #10)
    ref: torch.nn.Module  # a frozen copy of the initial policy
    tokenizer: Any
    reward_fn: Callable  # the one reward interface: reward(prompts, responses) -> [B] floats
    train_prompts: list
    eval_prompts: list
    monitor: Any = None  # a RewardEnsemble that only watches (--monitor-ensemble), or None
    world: bool = False  # the prompts are the tutoring world's: the true utility of the samples can be logged
    accelerator: Any = None  # several processes (torchrun / accelerate launch): DDP; None in one process
    dtype: str = "fp32"  # --dtype: the forward passes' precision (`precision()`)

    def precision(self):
        """The forward passes' autocast (--dtype bf16); a no-op context in fp32."""
        return autocast(self.dtype, self.device)

    @property
    def processes(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    def for_training(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` as the update's forward/backward should call it: DDP-wrapped with several processes (the
        same parameters: sampling, evaluation and saving use `module` itself), `module` in one process."""
        return self.accelerator.prepare_model(module) if self.accelerator is not None else module


def load_monitor(spec: str, device: torch.device):
    """The --monitor-ensemble ensemble on `device` (None when not asked for); one reward model is refused: the
    spread of one member is always 0."""
    if not spec:
        return None
    from preflab.reward.model import RewardEnsemble, load_reward_model

    monitor = load_reward_model(spec)
    check(
        isinstance(monitor, RewardEnsemble) and len(monitor.members) > 1,
        f"monitor_ensemble {spec!r} is not an ensemble of 2 or more members (train one with --ensemble K)",
    )
    for member in monitor.members:
        member.to(device)
    return monitor


def load_prompt_sets(spec: str, n_prompts: int, n_eval: int, seed: int) -> tuple[list, list]:
    """(training prompts, held-out prompts) as the data gives them (strings or chat messages)."""
    if spec == "world":
        from preflab.world import prompts

        return prompts(n_prompts, seed=seed, split="train"), prompts(n_eval, seed=seed + 1, split="eval")
    from preflab.data import load_prompts

    rows = load_prompts(spec).rows
    check(len(rows) > n_eval, f"{spec} has {len(rows)} prompts: too few to hold out eval_prompts={n_eval}")
    return (rows[:-n_eval], rows[-n_eval:]) if n_eval else (rows, [])


def setup_online(config: OnlineConfig, stage_name: str) -> OnlineSetup:
    from preflab.models import load_model
    from preflab.reward import load_reward

    set_threads(config.threads)
    seed_everything(config.seed)
    train_prompts, eval_prompts = load_prompt_sets(config.prompts, config.n_prompts, config.eval_prompts, config.seed)
    reward_fn = load_reward(config.reward)
    policy, tokenizer = load_model(config.model)  # dropout off, pad != eos (details #1, #10)
    policy = add_lora(policy, config, base=config.model)  # --lora-r: only the adapters train
    run = Run(config.out or None, stage_name, config)
    accelerator = make_accelerator(dtype=config.dtype)
    device = accelerator.device
    check(
        config.mini_batch_size >= accelerator.num_processes,
        f"mini_batch_size ({config.mini_batch_size}) must be at least the number of processes "
        f"({accelerator.num_processes}): each process takes every world-th row of a minibatch",
    )
    policy.to(device)
    monitor = load_monitor(config.monitor_ensemble, device)
    # the reference: a frozen copy of the starting policy, or with LoRA the same weights with the adapter off
    return OnlineSetup(
        run=run,
        device=device,
        policy=policy,
        ref=reference_of(policy),
        tokenizer=tokenizer,
        reward_fn=reward_fn,
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        monitor=monitor,
        world=config.prompts == "world",
        accelerator=accelerator if accelerator.num_processes > 1 else None,
        dtype=config.dtype,
    )


class PromptCycle:
    """Endless batches of prompts: every prompt once per pass, in a fresh random order each pass. Its position
    (`order`, the rest of the current pass) goes into checkpoints."""

    def __init__(self, prompts: list, batch_size: int, generator: torch.Generator):
        self.prompts, self.batch_size, self.generator = prompts, batch_size, generator
        self.order: list[int] = []

    def __iter__(self) -> Iterator[list]:
        return self

    def __next__(self) -> list:
        while len(self.order) < self.batch_size:
            self.order += torch.randperm(len(self.prompts), generator=self.generator).tolist()
        chosen, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return [self.prompts[i] for i in chosen]


# ---- several processes: each takes every world-th row, then every process holds them all --------------------


def my_rows(setup: OnlineSetup, n: int) -> list[int]:
    """The rows of an n-row batch this process samples, scores and computes log-probs for."""
    return shard(list(range(n)), setup.accelerator)


def all_processes_done(setup: OnlineSetup) -> Callable[[bool], bool]:
    """`all_done(flag)`: True when `flag` is True on every process (one all-reduce per sampled token)."""
    import torch.distributed as dist

    def all_done(flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=setup.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    return all_done


def gather_rows(setup: OnlineSetup, local: torch.Tensor, rows: list[int], n: int) -> torch.Tensor:
    """The n-row tensor whose `rows` each process holds in `local`: zeros elsewhere, summed over processes
    (x + 0 is x, so every row arrives bit for bit)."""
    import torch.distributed as dist

    dtype = local.dtype
    full = torch.zeros((n, *local.shape[1:]), dtype=torch.long if dtype == torch.bool else dtype, device=setup.device)
    full[rows] = local.to(setup.device, full.dtype)
    dist.all_reduce(full)
    return full.to(dtype)


def over_rows(setup: OnlineSetup, batch: dict, fn: Callable):
    """`fn(batch)` ([B, ...] tensors, or a tuple of them); with several processes each computes its rows and
    every process gets all of them."""
    if setup.accelerator is None:
        return fn(batch)
    n = batch["input_ids"].shape[0]
    rows = my_rows(setup, n)
    out = fn(take(batch, rows))
    if isinstance(out, tuple):
        return tuple(gather_rows(setup, t, rows, n) for t in out)
    return gather_rows(setup, out, rows, n)


def reward_all(setup: OnlineSetup, prompts: list, texts: list[str]) -> torch.Tensor:
    """The reward of every (prompt, response); with several processes each scores its rows."""
    if setup.accelerator is None:
        return setup.reward_fn(prompts, texts)
    rows = my_rows(setup, len(prompts))
    local = setup.reward_fn([prompts[i] for i in rows], [texts[i] for i in rows]).float()
    return gather_rows(setup, local, rows, len(prompts)).cpu()


def sample_all(setup: OnlineSetup, prompts: list, config: OnlineConfig, generator: torch.Generator) -> Rollout:
    """`sample` on every prompt. With several processes each samples its rows, drawing what one process would
    draw (`rollout.generate(rows=...)`), and every process gets the whole rollout: the one-process rollout."""
    if setup.accelerator is None:
        return sample(setup.policy, setup.tokenizer, prompts, config, generator)
    import torch.distributed as dist

    ids = [encode_prompt(setup.tokenizer, p) for p in prompts]
    rows = my_rows(setup, len(prompts))
    mine = generate(
        setup.policy,
        setup.tokenizer,
        ids,
        config.max_new_tokens,
        temperature=config.temperature,
        generator=generator,
        rows=rows,
        all_done=all_processes_done(setup),
    )
    lengths = mine.lengths.tolist()
    part = (rows, mine.completion_ids, [lp[:n] for lp, n in zip(mine.logps, lengths)], mine.texts, mine.finished)
    parts: list = [None] * setup.processes
    dist.all_gather_object(parts, part)
    completions, logps, texts, finished = [None] * len(ids), [None] * len(ids), [None] * len(ids), [None] * len(ids)
    for rows_k, completions_k, logps_k, texts_k, finished_k in parts:
        for j, i in enumerate(rows_k):
            completions[i], logps[i], texts[i], finished[i] = completions_k[j], logps_k[j], texts_k[j], finished_k[j]
    batch = collate(ids, completions, setup.tokenizer.pad_token_id)
    padded = torch.zeros(batch["completion_mask"].shape)
    for i, lp in enumerate(logps):
        padded[i, : lp.shape[0]] = lp
    return Rollout(batch=batch, logps=padded, completion_ids=completions, texts=texts, finished=torch.stack(finished))


# ---- steps 1-3: rollout and score --------------------------------------------------------------------------


@dataclass
class ScoredRollout:
    """Sampled responses with their log-probs under the policy and the reference, and their scores."""

    rollout: Rollout  # texts, lengths, finished
    batch: dict  # collate layout, on the device
    old_logps: torch.Tensor | None  # [B, C] policy log-probs at sampling time (recomputed by a full forward);
    #                                 None when the update's own forward supplies them (`single_pass`)
    entropy: torch.Tensor | None  # [B, C] policy entropy per token (None with old_logps)
    ref_logps: torch.Tensor | None  # [B, C] reference log-probs; None when no KL is needed (`needs_reference`)
    scores: torch.Tensor  # [B] reward minus the missing-EOS penalty
    watch: dict = field(default_factory=dict)  # what `watch_samples` measured, logged beside the method's metrics

    @property
    def mask(self) -> torch.Tensor:
        return self.batch["completion_mask"].float()


def single_pass(config: OnlineConfig, n_rows: int, processes: int = 1) -> bool:
    """One epoch, one minibatch and one micro-batch per rollout batch: the update's single forward runs the very
    policy that sampled, on the very batch, so its own log-probs (detached) are the old log-probs (and, for PPO,
    its values the old values) and the recompute after sampling is skipped. Exactly equivalent: the recompute is
    the same forward of the same model on the same rows (dropout is off), so the first ratio is 1 either way
    (detail #17); tests/policy check that the losses agree within 1e-5. Sampling's own log-probs are not used
    instead: the cached decode differs from a full forward by rounding. One process only: with several, steps 4-6
    need the whole batch (global whitening), which the update's forward of one share does not see."""
    return (
        processes == 1 and config.epochs == 1 and config.mini_batch_size >= n_rows and config.micro_batch_size >= n_rows
    )


def needs_reference(config: OnlineConfig) -> bool:
    """Does a critic-free run need the reference's log-probs? Not with beta 0 and nothing reading the KL (no
    adaptive target, no max_kl): the loss and the advantages never see it (TRL skips it too). PPO always runs
    the reference: its KL is logged and plotted (the demo's sweep shows it growing at beta 0)."""
    return config.beta > 0 or config.target_kl > 0 or config.max_kl > 0


def score_responses(reward_fn, prompts: list, rollout: Rollout, missing_eos_penalty: float) -> torch.Tensor:
    """The reward on (prompt as given, decoded response), minus the penalty where no EOS came (detail #4)."""
    scores = reward_fn(prompts, rollout.texts).float().cpu()
    return scores - missing_eos_penalty * (~rollout.finished).float()


def watch_samples(setup: OnlineSetup, prompts: list, texts: list[str]) -> dict:
    """Measurements of the step's samples that never reach the loss: `true_utility` (world prompts: the mean
    true utility) and `ensemble/disagreement` (with --monitor-ensemble: mean over samples of std_k r_k, the
    population std of the members' normalised rewards), to plot one beside the other over training."""
    out = {}
    if setup.world:
        from preflab.world import true_utility

        out["true_utility"] = sum(true_utility(p, t).total for p, t in zip(prompts, texts)) / max(len(texts), 1)
    if setup.monitor is not None:
        out["ensemble/disagreement"] = setup.monitor.member_rewards(prompts, texts).std(0, unbiased=False).mean().item()
    return out


def sample(policy, tokenizer, prompts: list, config: OnlineConfig, generator: torch.Generator) -> Rollout:
    """Pure sampling at the configured temperature, stopping at EOS (details #3, #4)."""
    return generate(
        policy,
        tokenizer,
        [encode_prompt(tokenizer, p) for p in prompts],
        config.max_new_tokens,
        temperature=config.temperature,
        generator=generator,
    )


@torch.no_grad()
def rollout_and_score(
    setup: OnlineSetup,
    prompts: list,
    config: OnlineConfig,
    step: int,
    old_logps: bool = True,
    reference: bool = True,
) -> ScoredRollout:
    """Steps 1-3 of every online loop. The old log-probs are recomputed by a full forward, not taken from
    sampling, so the first PPO ratio is exactly 1 (detail #17); temperature on policy and reference (detail #3).
    `old_logps=False` skips that recompute (the update's own forward supplies them: `single_pass`);
    `reference=False` skips the reference (`needs_reference`). The reference and the reward run under
    `torch.inference_mode` (no autograd bookkeeping; the results are cloned into ordinary tensors)."""
    generator = torch.Generator(device=setup.device).manual_seed(config.seed * 100003 + step)
    with setup.precision():
        rollout = sample_all(setup, prompts, config, generator)
        batch = {k: v.to(setup.device) for k, v in rollout.batch.items()}
        old, entropy = None, None
        if old_logps:
            old, entropy = over_rows(
                setup,
                batch,
                lambda b: chunked_logps(setup.policy, b, config.temperature, config.mini_batch_size, entropy=True),
            )
        ref_logps = None
        with torch.inference_mode():
            if reference:
                ref_logps = over_rows(
                    setup, batch, lambda b: chunked_logps(setup.ref, b, config.temperature, config.mini_batch_size)
                )
            scores = score_responses(lambda p, t: reward_all(setup, p, t), prompts, rollout, config.missing_eos_penalty)
        ref_logps = None if ref_logps is None else ref_logps.clone()
        scores = scores.clone().to(setup.device)
    watch = watch_samples(setup, prompts, rollout.texts)
    return ScoredRollout(rollout, batch, old, entropy, ref_logps, scores, watch)


def check_scores(step: int, scores: torch.Tensor, kl: torch.Tensor, config: OnlineConfig) -> None:
    """Stop the run (keeping the last good checkpoint) on non-finite or absurd scores, or a KL past `max_kl`."""
    check_finite(step, scores=scores, kl=kl)
    worst = scores.abs().max().item()
    if worst > config.max_abs_score:
        raise TrainingStopped(
            f"step {step}: a score of magnitude {worst:.4g} is beyond max_abs_score "
            f"{config.max_abs_score:g} (is the reward broken?)"
        )
    mean_kl = kl.mean().item()
    if config.max_kl and mean_kl > config.max_kl:
        raise TrainingStopped(f"step {step}: objective/kl {mean_kl:.4g} is above max_kl {config.max_kl:g}")


# ---- the update: epochs x minibatches x micro-batches ------------------------------------------------------


def micro_batches(minibatch: dict, size: int) -> Iterator[dict]:
    """The micro-batches a minibatch's forward/backward runs over (gradients accumulate across them)."""
    for start in range(0, minibatch["input_ids"].shape[0], size):
        yield take(minibatch, slice(start, start + size))


def sync_on_last_of(accelerator, models: list, i: int, n: int):
    """`training.sync_on_last` for several DDP modules at once (PPO: policy and value model)."""
    stack = contextlib.ExitStack()
    for model in models:
        stack.enter_context(sync_on_last(accelerator, model, i, n))
    return stack


MAX_STATS = ("ratio_max_dev", "first_ratio_dev")  # maxima over rows; every other statistic is a sum


def reduce_stats(stats: dict, accelerator) -> dict:
    """A step's statistics over every process: the sums summed, the maxima maxed."""
    import torch.distributed as dist

    keys = sorted(stats)
    summed = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    maxed = summed.clone()
    dist.all_reduce(summed)
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
    return {k: (m if k in MAX_STATS else s) for k, s, m in zip(keys, summed.tolist(), maxed.tolist())}


def add_token_stats(stats: dict, values: dict, mask: torch.Tensor) -> None:
    """Accumulate masked per-token sums (divide by `stats['tokens']` for means over the step)."""
    for name, value in values.items():
        stats[name] = stats.get(name, 0.0) + (value * mask).sum().item()
    stats["tokens"] = stats.get("tokens", 0.0) + mask.sum().item()
    if "val/ratio" in values:
        dev = ((values["val/ratio"] - 1).abs() * mask).max().item()
        stats["ratio_max_dev"] = max(stats.get("ratio_max_dev", 0.0), dev)


def optimise(
    modules: list,
    optimizer,
    data: dict,
    config: OnlineConfig,
    generator: torch.Generator,
    minibatch_step: Callable[[dict, dict, dict], None],
    step: int = 0,
    accelerator=None,
) -> dict:
    """`config.epochs` passes over the rollout batch `data`, reshuffled each pass, one optimiser step per
    minibatch of `mini_batch_size` rows (detail #16). `minibatch_step(share, stats, minibatch)` runs the method's
    forward/backward on `share` (the minibatch in one process; with `accelerator`'s several processes, every
    world-th row of it), normalised over the whole `minibatch`, and accumulates its statistics. Returns the
    statistics of the whole step (over every process), with `first_ratio_dev`: max |ratio - 1| on the first
    minibatch of the first epoch (0 up to rounding: detail #17)."""
    world = accelerator.num_processes if accelerator is not None else 1
    params = [p for m in modules for p in m.parameters()]
    n_rows = data["input_ids"].shape[0]
    device = data["input_ids"].device
    for m in modules:
        m.train()
    stats: dict = {}
    for _epoch in range(config.epochs):
        order = torch.randperm(n_rows, generator=generator).to(device)
        for start in range(0, n_rows, config.mini_batch_size):
            optimizer.zero_grad(set_to_none=True)
            minibatch = take(data, order[start : start + config.mini_batch_size])
            share = minibatch if world == 1 else take(minibatch, slice(accelerator.process_index, None, world))
            minibatch_step(share, stats, minibatch)
            stats.setdefault("first_ratio_dev", stats.get("ratio_max_dev", 0.0))
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
            check_finite(step, grad_norm=grad_norm)  # before a NaN reaches the weights
            optimizer.step()
    for m in modules:
        m.eval()
    return stats if world == 1 else reduce_stats(stats, accelerator)


# ---- checkpoints and resume -------------------------------------------------------------------------------


@dataclass
class LoopState:
    """What an online loop carries from step to step, and into its checkpoints."""

    kl_ctl: Any  # the fixed or adaptive KL coefficient (`.value`)
    generator: torch.Generator  # the prompt order and the minibatch shuffles
    prompts: PromptCycle
    before: dict  # held-out numbers before training (for the summary)
    step: int
    budget: Budget


def start_loop(setup: OnlineSetup, config: OnlineConfig, optimizer, modules: dict | None = None) -> LoopState:
    """A fresh loop (held-out numbers measured before training), or with --resume the loop as its newest
    checkpoint left it: the policy's and `modules`' weights, optimiser, beta, generator, prompt position, clock."""
    kl_ctl = make_kl_controller(config.beta, config.target_kl, config.horizon)
    generator = torch.Generator().manual_seed(config.seed)
    prompts = PromptCycle(setup.train_prompts, config.batch_size, generator)
    ckpt = setup.run.resume_state()
    if ckpt is None:
        return LoopState(
            kl_ctl,
            generator,
            prompts,
            evaluate_policy(setup, config, config.seed + 7),
            0,
            Budget(config.max_steps, config.max_seconds),
        )
    ckpt.load_model_weights(setup.policy)
    for name, module in (modules or {}).items():
        module.load_state_dict(ckpt.state["modules"][name])
    optimizer.load_state_dict(ckpt.state["optimizer"])
    kl_ctl.value = ckpt.state["beta"]
    generator.set_state(ckpt.state["generator"])
    prompts.order = list(ckpt.state["order"])
    step, elapsed = ckpt.state["loop"]
    return LoopState(
        kl_ctl,
        generator,
        prompts,
        ckpt.state["before"],
        step,
        Budget(config.max_steps, config.max_seconds, elapsed=elapsed),
    )


def save_loop(setup: OnlineSetup, loop: LoopState, optimizer, modules: dict | None = None) -> None:
    """A checkpoint of the policy and everything `start_loop` needs to continue exactly."""
    setup.run.save_checkpoint(
        loop.step,
        setup.policy,
        setup.tokenizer,
        {
            "optimizer": optimizer.state_dict(),
            "beta": loop.kl_ctl.value,
            "generator": loop.generator.get_state(),
            "order": list(loop.prompts.order),
            "before": loop.before,
            "loop": (loop.step, loop.budget.elapsed),
            "modules": {name: m.state_dict() for name, m in (modules or {}).items()},
        },
    )


# ---- evaluation and the end of a run -----------------------------------------------------------------------


@torch.no_grad()
def evaluate_policy(setup: OnlineSetup, config: OnlineConfig, seed: int) -> dict:
    """Mean reward, KL(pi || ref) per sequence (k1, summed over tokens), length and EOS rate on held-out prompts."""
    if not setup.eval_prompts:
        return {}
    with setup.precision():
        generator = torch.Generator(device=setup.device).manual_seed(seed)
        rollout = sample_all(setup, setup.eval_prompts, config, generator)
        batch = {k: v.to(setup.device) for k, v in rollout.batch.items()}
        logp = over_rows(setup, batch, lambda b: chunked_logps(setup.policy, b, config.temperature, 64))
        ref_logp = over_rows(setup, batch, lambda b: chunked_logps(setup.ref, b, config.temperature, 64))
        scores = reward_all(setup, setup.eval_prompts, rollout.texts).float()
    return {
        "reward": scores.mean().item(),
        "kl": (logp - ref_logp).sum(-1).mean().item(),
        "length": rollout.lengths.float().mean().item(),
        "eos_rate": rollout.finished.float().mean().item(),
    }


def finish_online(
    setup: OnlineSetup, name: str, config: OnlineConfig, loop: LoopState, extra: dict | None = None
) -> dict:
    """Held-out evaluation after training, the policy saved as a HF directory, the summary."""
    after = evaluate_policy(setup, config, config.seed + 7)
    if after:
        setup.run.log(loop.step, {f"{name}/eval/{k}": v for k, v in after.items()})
    setup.run.save_model(setup.policy, setup.tokenizer)
    summary = {"steps": loop.step, "beta": loop.kl_ctl.value, "model": str(setup.run.model_dir), **(extra or {})}
    summary.update({f"eval_{k}_before": v for k, v in loop.before.items() if k != "kl"})
    summary.update({f"eval_{k}_after": v for k, v in after.items()})
    return setup.run.finish(summary)
