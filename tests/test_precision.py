"""`--dtype bf16`: accelerate's mixed precision for prepared models, autocast for what runs outside them, and the
policy and its reference in one precision (so DPO's first ratio is still exactly 1)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import make_model
from torch.nn.modules.module import register_module_forward_hook

from preflab.config import ConfigError
from preflab.data import collate_pairs, tokenize_rows
from preflab.data.preferences import parse_preference
from preflab.policy.dpo import DPOConfig, Reference, batch_loss, reference_logps
from preflab.runs import read_metrics
from preflab.sft import SFTConfig
from preflab.training import autocast, make_accelerator
from preflab.world.annotators import annotator_pool, simulate_votes, world_pairs


def mlp_output_dtypes(model) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


def test_bf16_autocasts_a_prepared_model_and_a_later_fp32_stage_does_not(tokenizer):
    ids = torch.tensor([[5, 6, 7, 8]])
    model = make_model(tokenizer)
    seen = mlp_output_dtypes(model)
    accelerator = make_accelerator(cpu=True, dtype="bf16")
    logits = accelerator.prepare(model)(input_ids=ids).logits
    assert seen == [torch.bfloat16]
    assert logits.dtype == torch.float32  # accelerate hands outputs back in fp32
    # the demo runs stages one after another in one process: the next stage's fp32 is fp32 again
    plain = make_model(tokenizer)
    seen = mlp_output_dtypes(plain)
    make_accelerator(cpu=True).prepare(plain)(input_ids=ids)
    assert seen == [torch.float32]


def test_autocast_context_for_unprepared_code(tokenizer):
    model = make_model(tokenizer)
    seen = mlp_output_dtypes(model)
    with torch.no_grad(), autocast("bf16"):
        model(input_ids=torch.tensor([[5, 6, 7]]))
    with torch.no_grad(), autocast("fp32"):
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert seen == [torch.bfloat16, torch.float32]


def test_dpo_reference_in_the_policys_precision_keeps_the_first_ratio_at_one(tokenizer):
    votes = simulate_votes(world_pairs(8), annotator_pool(3), seed=0)
    rows = [parse_preference(v, f"test:{i + 1}") for i, v in enumerate(votes)]
    pairs = tokenize_rows(tokenizer, rows, 64, 32)[0]
    pad = tokenizer.pad_token_id
    reference = make_model(tokenizer)
    policy = make_accelerator(cpu=True, dtype="bf16").prepare(copy.deepcopy(reference))
    batch, indices = collate_pairs(pairs[:4], pad), [0, 1, 2, 3]
    with autocast("bf16"):  # what train_dpo does with --dtype bf16
        same = Reference(reference_logps(reference, pairs, pad, 4))
    loss, metrics = batch_loss(policy, batch, same(indices, batch), DPOConfig())
    assert metrics["rewards/chosen"] == 0.0 and metrics["rewards/rejected"] == 0.0
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)
    # a reference scored in fp32 against a bf16 policy would start from a ratio that is not 1
    fp32 = Reference(reference_logps(reference, pairs, pad, 4))
    _, skewed = batch_loss(policy, batch, fp32(indices, batch), DPOConfig())
    assert abs(skewed["rewards/chosen"]) > 1e-5


def test_bad_dtype_is_refused_with_its_value():
    with pytest.raises(ConfigError, match="'fp16'"):
        SFTConfig(dtype="fp16")


@pytest.mark.slow
def test_sft_cli_in_bf16_trains_close_to_fp32(model_dir, tmp_path):
    from preflab.cli import main
    from preflab.world import demonstrations

    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps(d) + "\n" for d in demonstrations(24, seed=0)))
    losses = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        argv = ["sft", "--model", str(model_dir), "--data", str(demos), "--max-steps", "2", "--batch-size", "4"]
        assert main([*argv, "--log-every", "1", "--dtype", dtype, "--out", str(out)]) == 0
        losses[dtype] = [m["sft/loss"] for m in read_metrics(out) if "sft/loss" in m]
    assert len(losses["bf16"]) == len(losses["fp32"]) == 2
    assert losses["bf16"] != losses["fp32"]  # it did run in another precision
    for a, b in zip(losses["bf16"], losses["fp32"], strict=True):
        assert a == pytest.approx(b, abs=0.05)


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_online_rl_in_bf16_starts_at_ratio_one_and_kl_zero(stage, model_dir, tmp_path):
    """Sampling, old and reference log-probs, values and the update's forwards all autocast: the first minibatch's
    ratio is 1 and the KL 0, as in fp32, with minibatches smaller than the rollout (the recompute path)."""
    from preflab.cli import main

    argv = [stage, "--model", str(model_dir), "--reward", "preflab.world.rewards:length_closeness", "--dtype", "bf16"]
    argv += ["--max-steps", "1", "--max-new-tokens", "5", "--eval-prompts", "0", "--n-prompts", "8"]
    argv += ["--batch-size", "4", "--mini-batch-size", "2", "--micro-batch-size", "2", "--out", str(tmp_path / "r")]
    if stage == "grpo":
        argv += ["--k", "2", "--beta", "0.04"]
    seen = []

    def linear_output(module, inputs, output):
        if isinstance(module, torch.nn.Linear):
            seen.append(output.dtype)

    hook = register_module_forward_hook(linear_output)
    try:
        assert main(argv) == 0
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # every linear layer ran in bf16, sampling and update alike
    first = read_metrics(tmp_path / "r")[0]
    assert first[f"{stage}/objective/kl"] == 0.0 and first[f"{stage}/policy/first_ratio_dev"] < 1e-6
