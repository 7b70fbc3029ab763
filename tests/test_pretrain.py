"""Pretrain: a CLI smoke run whose saved directory loads with plain transformers; perplexity by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_model

from preflab.cli import main
from preflab.pretrain import perplexity, read_corpus, token_stream
from preflab.runs import read_metrics


@pytest.mark.slow
def test_cli_smoke_saves_a_plain_hugging_face_directory(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--world-docs",
                "400",
                "--vocab-size",
                "300",
                "--max-steps",
                "4",
                "--max-seconds",
                "0",
                "--seq-len",
                "32",
                "--batch-size",
                "4",
                "--checkpoint-every",
                "2",
                "--log-every",
                "1",
                "--eval-batches",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.chat_template and "<|assistant|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and math.isfinite(summary["heldout_perplexity"])
    assert 1 < summary["heldout_perplexity"] < 10 * len(tokenizer)
    last = out / "checkpoints" / "step-00000004"
    assert (last / "trainer_state.pt").exists() and (last / "model.safetensors").exists()
    assert torch.load(last / "trainer_state.pt", weights_only=False)["step"] == 4
    assert (out / "config.yaml").exists() and list(out.glob("events.*"))
    steps = [r["step"] for r in read_metrics(out) if "pretrain/loss" in r]
    assert steps == [1, 2, 3, 4]


def test_perplexity_is_exp_of_mean_heldout_loss(tokenizer):
    model = make_model(tokenizer)
    stream = token_stream(tokenizer, ["The capital of France is Paris.", "2 + 3 = 5.", "Sure! 1 + 1 = 2."] * 4)
    seq = 8
    windows = torch.stack([stream[j * seq : (j + 1) * seq] for j in range(4)])
    with torch.no_grad():
        logp = model(input_ids=windows).logits.log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, windows[:, 1:, None]).mean()
    assert perplexity(model, stream, seq, batch_size=2, n_batches=2) == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_token_stream_wraps_each_document_in_bos_eos(tokenizer):
    stream = token_stream(tokenizer, ["a b", "c"]).tolist()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert stream[0] == bos and stream[-1] == eos and stream.count(bos) == 2 and stream.count(eos) == 2


def test_read_corpus_errors_name_the_line(tmp_path):
    from preflab.data import DataError

    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match="c.jsonl:2"):
        read_corpus(str(path), 10, 0)
    with pytest.raises(DataError, match="corpus not found"):
        read_corpus(str(tmp_path / "missing.txt"), 10, 0)
