"""Shared fixtures: tiny models built locally from a config, offline, on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("PREFLAB_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from preflab.models import ModelSize, tiny_config, train_tokenizer

HH_RLHF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl"
# A model small enough that a training step takes milliseconds.
MICRO = ModelSize(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=300,
    max_position_embeddings=256,
)

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    """A 300-token byte-level BPE trained on the tutoring world's corpus (pad, bos, eos distinct)."""
    from preflab.world import corpus

    return train_tokenizer(corpus(2000, seed=0), vocab_size=MICRO.vocab_size)


def make_model(tokenizer, seed: int = 0, **config_overrides):
    from transformers import LlamaForCausalLM

    config = tiny_config(MICRO, tokenizer)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@pytest.fixture
def model(tokenizer):
    """A freshly initialised micro Llama (random weights, seed 0)."""
    return make_model(tokenizer)


@pytest.fixture
def micro_model_with_dropout(tokenizer):
    """The micro Llama with dropout configured (attention_dropout=0.5 in its config, seed 0), as a model from a
    hub may come: in train() mode its forward passes are random until `disable_dropout` is applied."""
    return make_model(tokenizer, attention_dropout=0.5)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A saved Hugging Face directory of the micro Llama (safetensors + tokenizer)."""
    path = tmp_path_factory.mktemp("micro-llama")
    make_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hh_rlhf_path():
    if not HH_RLHF.exists():
        pytest.skip(f"{HH_RLHF} not present")
    return HH_RLHF


def demos_file(tmp_path):
    """40 world demonstrations as a prompt/completion JSONL file."""
    import json

    from preflab.world import demonstrations

    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in demonstrations(40, seed=0)))
    return path


def prefs_file(tmp_path):
    """40 comparisons (a world demonstration chosen over "I do not know.") as a preference JSONL file."""
    import json

    from preflab.world import demonstrations

    path = tmp_path / "prefs.jsonl"
    rows = (
        {"prompt": d["prompt"], "chosen": d["completion"], "rejected": "I do not know."}
        for d in demonstrations(40, seed=1)
    )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def ensemble_dir(tmp_path_factory, tokenizer):
    """A saved 2-member reward ensemble of micro Llamas (random backbones and heads, seeds 0 and 1): members
    that disagree."""
    from preflab.reward.model import RewardEnsemble, RewardModel

    path = tmp_path_factory.mktemp("micro-ensemble")
    members = [RewardModel(make_model(tokenizer, seed=k), tokenizer, seed=k) for k in (0, 1)]
    RewardEnsemble(members).save(path)
    return path


@pytest.fixture
def quick_bench(tmp_path):
    """run(SCRIPT, *options, timeout=S): bench/SCRIPT --quick --libs preflab --threads 1 --out tmp_path, which
    must exit 0 (`make test` does not install TRL, the benchmark-only extra). For tests/bench."""

    def run(script: str, *options: str, timeout: int) -> None:
        bench = Path(__file__).resolve().parents[1] / "bench" / script
        command = [sys.executable, str(bench), "--quick", "--libs", "preflab", "--threads", "1"]
        proc = subprocess.run(
            [*command, *options, "--out", str(tmp_path)], capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    return run
