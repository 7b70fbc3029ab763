"""LoRA: the reference is the base with the adapter off, only adapters train, a run folder loads back onto its base,
and a merged export is a plain model that generates what the adapter model generates."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file

from preflab.adapters import AdapterDisabled, add_lora, is_adapted, reference_of
from preflab.cli import main
from preflab.config import ConfigError
from preflab.data import TokenizedExample, collate_examples
from preflab.logps import sequence_logps
from preflab.models import load_model
from preflab.sft import SFTConfig

LORA = SFTConfig(model="m", lora_r=4, lora_alpha=8.0)
BATCH = [TokenizedExample([1, 40, 41, 42], [50, 51, 2]), TokenizedExample([1, 43], [52, 2])]


def live_adapter(model):
    """Adapters start as the identity (B = 0); give them weights so that adapter on and off differ."""
    adapted = add_lora(model, LORA, base="micro")
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return adapted


def test_the_reference_is_the_base_with_the_adapter_off_and_shares_its_weights(tokenizer):
    base = make_model(tokenizer)
    expected, _ = sequence_logps(make_model(tokenizer), collate_examples(BATCH, tokenizer.pad_token_id))
    adapted = live_adapter(base)
    ref = reference_of(adapted)
    assert isinstance(ref, AdapterDisabled) and list(ref.parameters()) == []  # no second copy in memory
    batch = collate_examples(BATCH, tokenizer.pad_token_id)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(ref, batch)
        policy_logps, _ = sequence_logps(adapted, batch)
    assert torch.equal(ref_logps, expected)
    assert not torch.allclose(policy_logps, expected, atol=1e-3)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the base is frozen


def test_bad_targets_name_the_option(tokenizer):
    with pytest.raises(ConfigError, match="lora_targets 'nope_proj'"):
        add_lora(make_model(tokenizer), SFTConfig(model="m", lora_r=2, lora_targets="nope_proj"), base="micro")
    with pytest.raises(ConfigError, match="lora_r must be >= 0, got -1"):
        SFTConfig(model="m", lora_r=-1)


def test_sft_with_lora_trains_only_adapters_and_the_merged_export_generates_the_same(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from preflab.world import demonstrations

    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps(d) + "\n" for d in demonstrations(40, seed=0)))
    out = tmp_path / "sft"
    assert (
        main(
            [
                "sft",
                "--model",
                str(model_dir),
                "--data",
                str(demos),
                "--max-steps",
                "4",
                "--batch-size",
                "4",
                "--held-out",
                "0.25",
                "--lr",
                "0.02",
                "--lora-r",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "model" / "adapter_model.safetensors").exists() and not (out / "model" / "model.safetensors").exists()
    adapted, tokenizer = load_model(out)  # a later stage takes the run folder
    assert is_adapted(adapted)
    original = load_file(model_dir / "model.safetensors")
    base = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in adapted.state_dict().items()
        if "lora_" not in k
    }
    assert all(torch.equal(base[k], original[k]) for k in original)  # the base weights never moved
    assert main(["export", str(out), "--merge", "true", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert any(not torch.equal(p, original[n]) for n, p in merged.state_dict().items() if n in original)
    prompt = torch.tensor([[tokenizer.bos_token_id, 40, 41, 42, 43]])
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(adapted.generate(input_ids=prompt, **kwargs), merged.generate(input_ids=prompt, **kwargs))
    assert main(["export", str(out), "--out", str(tmp_path / "x")]) == 2  # an adapter needs --merge


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_online_rl_with_lora_starts_at_ratio_one_and_kl_zero(stage, model_dir, tmp_path):
    from preflab.runs import read_metrics

    argv = [
        stage,
        "--model",
        str(model_dir),
        "--reward",
        "preflab.world.rewards:length_closeness",
        "--max-steps",
        "2",
        "--max-new-tokens",
        "5",
        "--eval-prompts",
        "2",
        "--n-prompts",
        "8",
        "--batch-size",
        "4",
        "--mini-batch-size",
        "2",
        "--micro-batch-size",
        "2",
        "--lora-r",
        "4",
        "--lr",
        "0.01",
        "--out",
        str(tmp_path / "r"),
    ]
    if stage == "grpo":
        argv += ["--k", "2"]
    assert main(argv) == 0
    first = read_metrics(tmp_path / "r")[0]
    assert first[f"{stage}/objective/kl"] == 0.0 and first[f"{stage}/policy/first_ratio_dev"] < 1e-6
    trained, _ = load_model(tmp_path / "r")
    assert is_adapted(trained)


def test_dpo_and_reward_with_lora(model_dir, tmp_path):
    from preflab.models import load_model as load
    from preflab.reward.model import RewardModel
    from preflab.world import demonstrations

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        "".join(
            json.dumps({"prompt": d["prompt"], "chosen": d["completion"], "rejected": "No."}) + "\n"
            for d in demonstrations(40, seed=1)
        )
    )
    common = ["--model", str(model_dir), "--data", str(prefs), "--max-steps", "3", "--batch-size", "4", "--lora-r", "4"]
    assert main(["dpo", *common, "--lr", "0.01", "--out", str(tmp_path / "dpo")]) == 0
    assert is_adapted(load(tmp_path / "dpo")[0])
    assert main(["reward", *common, "--out", str(tmp_path / "rm")]) == 0
    rm = RewardModel.load(tmp_path / "rm" / "model")  # a reward model is saved merged: plain
    assert not is_adapted(rm.backbone)
    assert main(["reward", *common, "--train-layers", "1", "--out", str(tmp_path / "rm2")]) == 2
