"""SFT: the loss reads completion tokens only, accumulation is exact, held-out loss falls, the CLI writes a model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model

from preflab.cli import main
from preflab.config import ConfigError
from preflab.data import TokenizedExample, collate_examples, position_ids
from preflab.policy import sequence_logps
from preflab.runs import read_metrics
from preflab.sft import SFTConfig, heldout_loss, sft, sft_loss

EXAMPLES = [
    TokenizedExample([1, 40, 41, 42], [50, 51, 2]),
    TokenizedExample([1, 43], [52, 2]),
    TokenizedExample([1, 44, 45], [53, 54, 55, 56, 2]),
    TokenizedExample([1, 46, 47, 48, 49], [57, 2]),
]


def hand_loss(model, examples):
    """Unpadded, one example at a time: -mean over completion tokens of log p(token | everything before)."""
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.prompt_ids + ex.completion_ids])
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]
        P = len(ex.prompt_ids)
        for t in range(P, ids.shape[1]):  # token t is predicted at position t-1; prompt tokens are never targets
            total = total - logp[t - 1, ids[0, t]]
            count += 1
    return total / count


def test_loss_is_token_mean_over_completion_tokens_only(model, tokenizer):
    batch = collate_examples(EXAMPLES, tokenizer.pad_token_id)
    per_token, _ = sequence_logps(model, batch)
    loss = sft_loss(per_token, batch["completion_mask"])
    torch.testing.assert_close(loss, hand_loss(model, EXAMPLES), atol=1e-5, rtol=0)
    # a token-mean, not a mean of per-row means: the 5-token completion weighs 5 times the 1-token one
    assert batch["completion_mask"].sum() == 3 + 2 + 5 + 2


def test_heldout_loss_is_a_token_mean_whatever_the_batching(model, tokenizer):
    expected = hand_loss(model, EXAMPLES).item()
    for batch_size in (1, 3, 4):
        assert heldout_loss(model, EXAMPLES, tokenizer.pad_token_id, batch_size) == pytest.approx(expected, abs=1e-5)


def test_prompt_tokens_carry_no_loss(model, tokenizer):
    """Marking prompt positions as completion would change the loss; the mask keeps them out entirely."""
    batch = collate_examples(EXAMPLES, tokenizer.pad_token_id)
    per_token, _ = sequence_logps(model, batch)
    # changing what sits in a prompt position changes the context, but adds or removes no loss term:
    # the number of terms is the number of completion tokens, whatever the prompts are
    longer = [TokenizedExample(e.prompt_ids + [60, 61], e.completion_ids) for e in EXAMPLES]
    batch2 = collate_examples(longer, tokenizer.pad_token_id)
    assert batch2["completion_mask"].sum() == batch["completion_mask"].sum()
    torch.testing.assert_close(sft_loss(*_logps_mask(model, batch2)), hand_loss(model, longer), atol=1e-5, rtol=0)
    # and the gradient of the loss w.r.t. the logits at prompt-predicting positions is exactly zero
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    logits = out.logits.detach().requires_grad_(True)
    P = int(batch["prompt_length"])
    logp = logits[:, P - 1 : -1].log_softmax(-1).gather(-1, ids[:, P:, None]).squeeze(-1)
    sft_loss(logp, batch["completion_mask"]).backward()
    assert logits.grad[:, : P - 1].abs().sum() == 0 and logits.grad[:, P - 1 :].abs().sum() > 0


def _logps_mask(model, batch):
    return sequence_logps(model, batch)[0], batch["completion_mask"]


def test_gradient_accumulation_4x1_equals_1x4(tokenizer):
    pad = tokenizer.pad_token_id

    def grads(micro_batches):
        model = make_model(tokenizer, seed=1)
        n_tokens = sum(int(collate_examples(m, pad)["completion_mask"].sum()) for m in micro_batches)
        for m in micro_batches:
            batch = collate_examples(m, pad)
            sft_loss(sequence_logps(model, batch)[0], batch["completion_mask"], n_tokens).backward()
        return [p.grad.clone() for p in model.parameters()]

    one = grads([EXAMPLES])
    four = grads([[e] for e in EXAMPLES])
    for a, b in zip(one, four):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_config_validation_quotes_the_value():
    with pytest.raises(ConfigError, match="-0.1"):
        SFTConfig(model="m", lr=-0.1)
    with pytest.raises(ConfigError, match="1.5"):
        SFTConfig(model="m", held_out=1.5)
    with pytest.raises(ConfigError, match="model is required"):
        SFTConfig()


@pytest.mark.slow
def test_heldout_loss_falls_on_world_demonstrations(model_dir, tmp_path):
    summary = sft(
        SFTConfig(
            model=str(model_dir),
            data="world",
            world_demos=300,
            batch_size=16,
            epochs=3,
            lr=3e-3,
            out=str(tmp_path / "run"),
            seed=0,
        )
    )
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"] - 0.5, summary
    evals = [row["sft/eval/loss"] for row in read_metrics(tmp_path / "run") if "sft/eval/loss" in row]
    assert evals[0] == pytest.approx(summary["heldout_loss_before"]) and evals[-1] == pytest.approx(
        summary["heldout_loss_after"]
    )


@pytest.mark.slow
def test_cli_smoke_writes_a_loadable_model(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from preflab.world import demonstrations

    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps(d) + "\n" for d in demonstrations(40, seed=0)))
    out = tmp_path / "run"
    assert (
        main(
            [
                "sft",
                "--model",
                str(model_dir),
                "--data",
                str(demos),
                "--max-steps",
                "3",
                "--batch-size",
                "4",
                "--grad-accum",
                "2",
                "--held-out",
                "0.25",
                "--out",
                str(out),
                "--log-every",
                "1",
            ]
        )
        == 0
    )
    before = AutoModelForCausalLM.from_pretrained(model_dir)
    after = AutoModelForCausalLM.from_pretrained(out / "model")
    changed = [torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters())]
    assert not any(changed), "every parameter moves in 3 AdamW steps"
    metrics = read_metrics(out)
    assert [r["step"] for r in metrics if "sft/loss" in r] == [1, 2, 3]
    assert all(r["sft/epoch"] > 0 for r in metrics if "sft/loss" in r)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["train_examples"] == 30 and summary["heldout_examples"] == 10
    assert "heldout_loss_before" in capsys.readouterr().out
    # a later stage takes the run folder as --model
    assert (
        main(["sft", "--model", str(out), "--data", str(demos), "--max-steps", "1", "--out", str(tmp_path / "r2")]) == 0
    )


def test_bad_demonstration_row_stops_or_is_skipped_and_counted(model_dir, tmp_path, capsys):
    from preflab.world import demonstrations

    rows = [json.dumps(d) for d in demonstrations(20, seed=0)]
    rows[4] = json.dumps({"prompt": "What is 2 + 3?", "completion": ""})
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(rows) + "\n")
    assert main(["sft", "--model", str(model_dir), "--data", str(path), "--out", str(tmp_path / "r1")]) == 2
    assert "demos.jsonl:5: field 'completion' is empty" in capsys.readouterr().err
    assert (
        main(
            [
                "sft",
                "--model",
                str(model_dir),
                "--data",
                str(path),
                "--skip-bad-rows",
                "true",
                "--max-steps",
                "1",
                "--held-out",
                "0.2",
                "--out",
                str(tmp_path / "r2"),
            ]
        )
        == 0
    )
    assert "skipped 1 of 20 rows (first: " in capsys.readouterr().out
    assert json.loads((tmp_path / "r2" / "summary.json").read_text())["train_examples"] == 15  # 19 rows, 4 held out


def test_cli_missing_data_and_model_exit_2(model_dir, tmp_path, capsys):
    assert (
        main(["sft", "--model", str(model_dir), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r")])
        == 2
    )
    assert "file not found" in capsys.readouterr().err
    assert main(["sft", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "r")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_stage_batch_4_accum_1_equals_batch_1_accum_4(model_dir, tmp_path):
    """Through the real loop: the same examples per step, the same token-mean gradient, the same weights."""
    from transformers import AutoModelForCausalLM

    def run(batch_size, grad_accum, name):
        sft(
            SFTConfig(
                model=str(model_dir),
                data="world",
                world_demos=40,
                batch_size=batch_size,
                grad_accum=grad_accum,
                max_steps=3,
                lr=1e-3,
                max_grad_norm=0.0,
                out=str(tmp_path / name),
            )
        )
        return AutoModelForCausalLM.from_pretrained(tmp_path / name / "model")

    a, b = run(4, 1, "a"), run(1, 4, "b")
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), start.parameters()):
        torch.testing.assert_close(pa, pb, atol=2e-5, rtol=1e-4, msg=name)
        assert not torch.equal(pa, p0), name


def test_a_dequantized_gguf_model_saves_after_fine_tuning(tokenizer, tmp_path):
    """`load_model("smollm2")` de-quantises but leaves transformers' GGUF quantizer on, which refused
    `save_pretrained` at the end of `preflab sft --model smollm2`; load_model now drops the marker."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    from preflab.models import drop_gguf_marker
    from preflab.runs import save_model

    model = make_model(tokenizer)
    model.hf_quantizer = GgufHfQuantizer(GgufConfig())
    model.config.quantization_config = GgufConfig()
    with pytest.raises(ValueError, match="not serializable"):
        save_model(model, tokenizer, tmp_path / "refused")
    drop_gguf_marker(model)
    save_model(model, tokenizer, tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
