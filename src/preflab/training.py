"""Small pieces every training loop shares: the accelerator, the learning-rate schedule, the budget, and the
guards that stop a run cleanly (Ctrl-C, non-finite numbers, limits)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time

import torch


def set_threads(threads: int) -> None:
    """Use `threads` intra-op threads (0 keeps torch's default: one per core)."""
    if threads and threads > 0:
        torch.set_num_threads(threads)


def runs_on_cpu() -> bool:
    """Whether the stages run on the CPU: no GPU visible, or PREFLAB_CPU=1."""
    return not torch.cuda.is_available() or os.environ.get("PREFLAB_CPU") == "1"


def make_accelerator(cpu: bool | None = None, gradient_accumulation_steps: int = 1, dtype: str = "fp32"):
    """An `accelerate.Accelerator`: CPU when no GPU is visible; `accelerate launch`/`torchrun` give DDP/FSDP.

    dtype "bf16" is accelerate's bf16 mixed precision: every prepared model's forward runs under autocast."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if cpu is None:
        cpu = runs_on_cpu()
    mixed_precision = "bf16" if dtype == "bf16" else "no"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        # one process may run stages of different precision one after another (the demo's pipeline)
        AcceleratorState._reset_state()
    return Accelerator(
        cpu=cpu, gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed_precision
    )


def autocast(dtype: str, device: torch.device | str = "cpu"):
    """The forward-pass precision of `--dtype` for code outside a prepared model (generation, scoring)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def lr_factor(progress: float, warmup: float = 0.05, floor: float = 0.0) -> float:
    """Linear warm-up over the first `warmup` of training, then cosine decay to `floor` (progress in [0, 1])."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return progress / warmup
    t = (progress - warmup) / max(1e-8, 1 - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class Budget:
    """Stops a loop at `max_steps` or `max_seconds`, whichever comes first (0 = no limit)."""

    def __init__(self, max_steps: int = 0, max_seconds: float = 0.0, elapsed: float = 0.0):
        assert max_steps > 0 or max_seconds > 0, "a budget needs max_steps or max_seconds"
        self.max_steps, self.max_seconds = max_steps, max_seconds
        self.start = time.time() - elapsed  # a resumed run carries on with the seconds it had spent

    @property
    def elapsed(self) -> float:
        return time.time() - self.start

    def progress(self, step: int) -> float:
        parts = []
        if self.max_steps:
            parts.append(step / self.max_steps)
        if self.max_seconds:
            parts.append(self.elapsed / self.max_seconds)
        return max(parts)

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0


def length_grouped(items: list, batch_size: int, rng, length) -> list:
    """`items` (already in a random order) reordered so that each consecutive run of `batch_size` holds items of
    like `length`: each run of 50 batches is sorted by length before it is cut, the full batches are shuffled
    with `rng`, and an incomplete one stays last. A batch pads to its longest sequence, so this computes on less
    padding (TRL's `group_by_length`) while every item is still seen once an epoch."""
    mega = 50 * batch_size
    ordered = [item for start in range(0, len(items), mega) for item in sorted(items[start : start + mega], key=length)]
    batches = [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
    full, tail = (batches[:-1], batches[-1:]) if batches and len(batches[-1]) < batch_size else (batches, [])
    rng.shuffle(full)
    return [item for batch in full + tail for item in batch]


def shard(items: list, accelerator) -> list:
    """This process's share of an optimiser step's items: every world-th one (all of them in one process)."""
    return items[accelerator.process_index :: accelerator.num_processes] if accelerator else items


def sync_on_last(accelerator, model, i: int, n: int):
    """Gradients all-reduced once per optimiser step, on the process's last micro-batch: processes with different
    numbers of micro-batches then still meet at one all-reduce each (a mismatch would hang DDP)."""
    return contextlib.nullcontext() if accelerator is None or i == n - 1 else accelerator.no_sync(model)


def join_without_data(accelerator, model) -> None:
    """A process whose share of the step is empty still joins the step's all-reduce, with a zero gradient."""
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.backward(sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0)


class TrainingStopped(RuntimeError):
    """A guard stopped the run (a non-finite number, a KL or reward out of range); the message names the step and
    the metric. The last good checkpoint is kept, and summary.json records why."""


def check_finite(step: int, **values) -> None:
    """Stop the run if any value (a float or a tensor) holds NaN or inf, naming the step and the metric."""
    for name, value in values.items():
        if value is None:
            continue
        finite = bool(value.isfinite().all()) if hasattr(value, "isfinite") else math.isfinite(float(value))
        if not finite:
            shown = value.float().flatten()[:4].tolist() if hasattr(value, "float") else value
            raise TrainingStopped(f"step {step}: {name} is not finite ({shown})")


def nonfinite_gradients(parameters) -> str | None:
    """The name of the first parameter whose gradient holds NaN or inf (None when all are finite)."""
    for name, p in parameters:
        if p.grad is not None and not bool(p.grad.isfinite().all()):
            return name
    return None


class StopRequest:
    """Ctrl-C handling for training loops: the first SIGINT asks the loop to stop after the current step (it
    writes a checkpoint and exits); a second SIGINT stops at once. Use as a context manager around the loop."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\n[preflab] stopping after this step and writing a checkpoint (Ctrl-C again to stop at once)", flush=True
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
