"""Run folders: every stage writes one.

    runs/<stage>-<time>/
        config.yaml        the resolved config
        metrics.jsonl      one JSON object per logged step: {"step": n, "<stage>/<group>/<name>": value, ...}
        events.*           TensorBoard event files (same names)
        model/             the final Hugging Face model directory (safetensors + tokenizer)
        checkpoints/       the last good checkpoints (`preflab.checkpoints`): model + optimiser + RNG state + step
        summary.json       the headline numbers, also printed as one line at the end (written last: a run
                           folder with it is finished)

`--resume` reopens a run folder: the config must match the one it was started with (else the differing fields
are named), the newest verified checkpoint is loaded, and metrics.jsonl keeps the rows up to that step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from preflab.config import ConfigError, to_dict


def default_out(stage: str) -> Path:
    return Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"


def is_main_process() -> bool:
    """Rank 0 of a `torchrun` / `accelerate launch` job, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().mean().item() if value.numel() != 1 else value.item()
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    return value


class Run:
    """A run folder with a metrics logger. `Run(out, stage, config)`; `log(step, metrics)`; `finish(summary)`."""

    def __init__(self, out: str | Path | None, stage: str, config: Any = None, tensorboard: bool = True):
        self.stage = stage
        self.resume = bool(getattr(config, "resume", False))
        if self.resume and not out:
            raise ConfigError("--resume needs --out: the run folder to continue")
        self.dir = Path(out) if out else default_out(stage)
        self.started = time.time()
        self.keep = int(getattr(config, "keep_checkpoints", 2))
        # Under `torchrun` / `accelerate launch` only the main process writes (config, metrics, checkpoints,
        # models, summary); the others compute the same run and write nothing.
        self.main = is_main_process()
        self._metrics, self._tb = None, None
        if not self.main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            fresh = {"stage": stage, **to_dict(config)}
            if self.resume and (self.dir / "config.yaml").exists():
                check_same_config(yaml.safe_load((self.dir / "config.yaml").read_text()) or {}, fresh, self.dir)
            (self.dir / "config.yaml").write_text(yaml.safe_dump(fresh, sort_keys=False))
        # a reused folder starts afresh; a resumed one keeps its rows (cut back to the checkpoint by `resume_state`)
        self._metrics = open(self.dir / "metrics.jsonl", "a" if self.resume else "w", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.dir))
            except Exception:  # tensorboard missing: metrics.jsonl still has everything
                self._tb = None

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {"step": int(step)}
        for key, value in metrics.items():
            value = _plain(value)
            row[key] = value
            if self._tb is not None and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        if self.main:
            self._metrics.write(json.dumps(row) + "\n")
        return row

    def save_model(self, model, tokenizer) -> Path:
        """The final model in `model/` (main process only)."""
        return save_model(model, tokenizer, self.model_dir) if self.main else self.model_dir

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    def finished_summary(self) -> dict | None:
        """The summary of a finished run (None when it has not finished)."""
        path = self.dir / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else None
        return summary if summary and summary.get("status") != "stopped" else None

    def save_checkpoint(self, step: int, model, tokenizer=None, state: dict | None = None) -> Path:
        """A verified checkpoint of `model` and the loop's `state` (optimiser, generators, data position...)."""
        from preflab.checkpoints import write_checkpoint

        if not self.main:
            return self.checkpoint_dir
        return write_checkpoint(self.checkpoint_dir, step, model, tokenizer, state or {}, keep=self.keep)

    def step_end(self, step: int, every: int, stop, save) -> None:
        """After an optimiser step: `save()` a checkpoint every `every` steps, and when Ctrl-C asked the loop to
        stop (`stop.requested`), then stop with KeyboardInterrupt."""
        if stop.requested or (every and step % every == 0):
            save()
        if stop.requested:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def guarded(self):
        """Around a training loop: yields the loop's Ctrl-C `StopRequest`; a guard's stop (TrainingStopped) is
        recorded in summary.json before it propagates; the checkpoints stay as they are."""
        from preflab.training import StopRequest, TrainingStopped

        try:
            with StopRequest() as stop:
                yield stop
        except TrainingStopped as exc:
            if self.main:
                (self.dir / "summary.json").write_text(
                    json.dumps({"status": "stopped", "reason": str(exc)}, indent=2) + "\n"
                )
            self.close()
            raise

    def resume_state(self):
        """With --resume: the newest verified checkpoint (None: nothing to resume, start afresh), the global RNG
        streams restored and metrics.jsonl cut back to the checkpoint's step. Without --resume: None."""
        from preflab.checkpoints import latest_checkpoint, set_rng_state

        if not self.resume:
            return None
        ckpt = latest_checkpoint(self.checkpoint_dir)
        if self.main:
            (self.dir / "summary.json").unlink(missing_ok=True)
            step = ckpt.step if ckpt else -1
            self._metrics.close()
            rows = [r for r in read_metrics(self.dir) if r.get("step", 0) <= step] if ckpt else []
            with open(self.dir / "metrics.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            self._metrics = open(self.dir / "metrics.jsonl", "a", buffering=1)
        if ckpt is None:
            print(
                f"[{self.stage}] --resume: no checkpoint in {self.checkpoint_dir}; starting from the beginning",
                flush=True,
            )
            return None
        set_rng_state(ckpt.state["rng"])
        print(f"[{self.stage}] resuming from {ckpt.path} (step {ckpt.step})", flush=True)
        return ckpt

    def finish(self, summary: dict[str, Any], quiet: bool = False) -> dict[str, Any]:
        summary = {k: _plain(v) for k, v in summary.items()}
        summary.setdefault("seconds", round(time.time() - self.started, 1))
        summary.setdefault("run_dir", str(self.dir))
        if not self.main:
            return summary
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.close()
        if not quiet:
            print(f"[{self.stage}] " + "  ".join(f"{k}={_fmt(v)}" for k, v in summary.items()), flush=True)
        return summary

    def close(self) -> None:
        if self._metrics is not None and not self._metrics.closed:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# Options that may change between a run and its resumption without changing what it computes.
RESUMABLE_CHANGES = {"resume", "keep_checkpoints", "threads", "out"}


def check_same_config(saved: dict, fresh: dict, run_dir: Path) -> None:
    """A resumed run must have the config it was started with: name every field that differs."""
    keys = (set(saved) | set(fresh)) - RESUMABLE_CHANGES
    diff = sorted(k for k in keys if saved.get(k) != fresh.get(k))
    if diff:
        detail = "; ".join(f"{k}: {saved.get(k)!r} then, {fresh.get(k)!r} now" for k in diff)
        raise ConfigError(
            f"{run_dir} was started with another config ({detail}); resume with the same options, "
            "or start a new run folder"
        )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def save_model(model, tokenizer, directory: str | Path) -> Path:
    """A normal Hugging Face directory: safetensors weights + config + tokenizer (for a LoRA model: the adapter and
    the name of its base, which `load_model` reads back)."""
    from preflab.adapters import is_adapted, save_adapter

    directory = Path(directory)
    if is_adapted(model):
        return save_adapter(model, tokenizer, directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress(iterable=None, total: int | None = None, desc: str = "", disable: bool | None = None, **kwargs):
    """A tqdm progress bar (on stderr), hidden when PREFLAB_QUIET=1."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = os.environ.get("PREFLAB_QUIET") == "1"
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        disable=disable,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0,
        leave=False,
        **kwargs,
    )
