"""Checkpoints that survive a crash: written atomically, verified by hash, the last good ones kept.

    <run>/checkpoints/step-00000040/
        model.safetensors, config.json, tokenizer files    the model as a Hugging Face directory
        trainer_state.pt                                    step, optimiser, RNG states, data position, extras
        manifest.json                                       sha256 of every file above (written last)

A checkpoint is written into `step-N.tmp/`, each file fsynced, then renamed into place and the folder fsynced,
so a crash mid-write leaves only a `.tmp` folder that nobody reads. The previous checkpoints stay until the new
one is complete; then all but the newest `keep` are removed. On resume the newest checkpoint whose files match
its manifest is used; a corrupt or truncated one is reported and the one before it is tried.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """Every global random stream a training loop may draw from."""
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(root: Path, step: int, model, tokenizer, state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep`. `state` holds what the loop needs
    to continue exactly (optimiser, generators, data position, ...); global RNG states are added here."""
    from preflab.runs import save_model

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp)
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    for path in files:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    manifest = {"step": step, "files": {p.name: _sha256(p) for p in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    with open(tmp / MANIFEST, "rb") as f:
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (a `.tmp` folder is an interrupted write and never counts)."""
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp")
    )


def verify(path: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        return "no manifest (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "the manifest is not valid JSON"
    for name, digest in manifest.get("files", {}).items():
        if not (path / name).exists():
            return f"{name} is missing"
        if _sha256(path / name) != digest:
            return f"{name} does not match its hash (corrupt or truncated)"
    return None


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict

    def load_model_weights(self, model) -> None:
        """The checkpoint's weights into `model`, in place (so optimiser references stay valid)."""
        from safetensors.torch import load_model

        from preflab.adapters import is_adapted, load_adapter_weights

        if is_adapted(model):
            load_adapter_weights(model, self.path)
        else:
            load_model(model, self.path / "model.safetensors", strict=False)


def latest_checkpoint(root: Path, say=print) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt ones are reported (and skipped, never deleted)."""
    for path in reversed(list_checkpoints(root)):
        problem = verify(path)
        if problem:
            say(f"[resume] skipping {path}: {problem}; trying the one before it")
            continue
        state = torch.load(path / STATE_FILE, weights_only=False)
        return Checkpoint(path, int(state["step"]), state)
    return None
