"""Run folders: every stage writes one.

    runs/<stage>-<time>/
        config.yaml        the resolved config
        metrics.jsonl      one JSON object per logged step: {"step": n, "<stage>/<group>/<name>": value, ...}
        events.*           TensorBoard event files (same names)
        model/             the final Hugging Face model directory (safetensors + tokenizer)
        checkpoint/        the last good checkpoint: model + optimiser + RNG state + step (for --resume)
        summary.json       the headline numbers, also printed as one line at the end

A checkpoint is written to `checkpoint.tmp/` and renamed into place, so a crash or Ctrl-C mid-write leaves
the previous good checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from preflab.config import to_dict


def default_out(stage: str) -> Path:
    return Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"


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
        self.dir = Path(out) if out else default_out(stage)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        if config is not None:
            (self.dir / "config.yaml").write_text(yaml.safe_dump({"stage": stage, **to_dict(config)}, sort_keys=False))
        self._metrics = open(self.dir / "metrics.jsonl", "w", buffering=1)  # a reused folder starts afresh
        self._tb = None
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
        self._metrics.write(json.dumps(row) + "\n")
        return row

    def save_checkpoint(self, model, tokenizer=None, optimizer=None, step: int = 0, extra: dict | None = None) -> Path:
        """Atomically replace `checkpoint/` with model weights, optimiser and RNG state."""
        final = self.dir / "checkpoint"
        tmp = self.dir / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tokenizer, tmp)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            "extra": extra or {},
        }
        torch.save(state, tmp / "trainer_state.pt")
        old = self.dir / "checkpoint.old"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def finish(self, summary: dict[str, Any], quiet: bool = False) -> dict[str, Any]:
        summary = {k: _plain(v) for k, v in summary.items()}
        summary.setdefault("seconds", round(time.time() - self.started, 1))
        summary.setdefault("run_dir", str(self.dir))
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.close()
        if not quiet:
            print(f"[{self.stage}] " + "  ".join(f"{k}={_fmt(v)}" for k, v in summary.items()), flush=True)
        return summary

    def close(self) -> None:
        if not self._metrics.closed:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def save_model(model, tokenizer, directory: str | Path) -> Path:
    """A normal Hugging Face directory: safetensors weights + config + tokenizer."""
    directory = Path(directory)
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
    return tqdm(iterable, total=total, desc=desc, disable=disable, file=sys.stderr, dynamic_ncols=True, mininterval=1.0,
                leave=False, **kwargs)
