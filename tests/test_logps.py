"""Rows that share a prompt run it once (`preflab.logps.shared_prompt_forward`): the same log-probs, rewards,
values and gradients as the plain forward, within 1e-5, for a pair batch and an online group batch."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_model

from preflab.data.tokenize import TokenizedPair, collate, collate_pairs, position_ids
from preflab.logps import sequence_logps
from preflab.policy import dpo_loss
from preflab.policy.value import ValueModel
from preflab.reward.model import RewardModel


def random_ids(rng: random.Random, low: int, high: int) -> list[int]:
    return [rng.randrange(3, 300) for _ in range(rng.randrange(low, high))]


@pytest.fixture
def pair_batch(tokenizer):
    """Five pairs with prompts of 2-11 tokens (so most are left-padded) and responses of 1-8 tokens."""
    rng = random.Random(0)
    eos = tokenizer.eos_token_id
    pairs = [
        TokenizedPair(random_ids(rng, 2, 12), random_ids(rng, 0, 8) + [eos], random_ids(rng, 0, 8) + [eos])
        for _ in range(5)
    ]
    return collate_pairs(pairs, tokenizer.pad_token_id)


@pytest.fixture
def group_batch(tokenizer):
    """Two prompts x three samples each, in the rollout's layout (a prompt's samples next to each other)."""
    rng = random.Random(1)
    prompts = [random_ids(rng, 3, 10) for _ in range(2)]
    completions = [random_ids(rng, 1, 7) + [tokenizer.eos_token_id] for _ in range(6)]
    return collate([p for p in prompts for _ in range(3)], completions, tokenizer.pad_token_id)


def count_calls(model) -> list[int]:
    """Rows of every forward of `model` from now on."""
    rows: list[int] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return rows


def grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("layout", ["pair_batch", "group_batch"])
def test_shared_prompt_log_probs_and_gradients_equal_the_plain_forward(tokenizer, layout, request):
    batch = request.getfixturevalue(layout)
    model = make_model(tokenizer).train()
    rows = count_calls(model)
    results = {}
    for share in (False, True):
        rows.clear()
        per_token, summed, entropy = sequence_logps(
            model, batch, temperature=0.7, return_entropy=True, share_prompt=share
        )
        (summed.sum() + per_token.pow(2).sum()).backward()
        results[share] = (per_token.detach(), entropy, grads(model), list(rows))
    plain, shared = results[False], results[True]
    distinct = 5 if layout == "pair_batch" else 2
    assert plain[3] == [len(batch["input_ids"])]  # one forward over every row
    assert shared[3] == [distinct, len(batch["input_ids"])]  # the distinct prompts, then every row's response
    torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[1], plain[1], atol=1e-5, rtol=0)
    assert len(shared[2]) == len(plain[2]) == len(list(model.parameters()))
    for a, b in zip(shared[2], plain[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_rows_with_distinct_prompts_take_the_plain_forward(tokenizer):
    model = make_model(tokenizer)
    rows = count_calls(model)
    batch = collate([[5, 6, 7], [8, 9]], [[10, 2], [11, 12, 2]], tokenizer.pad_token_id)
    sequence_logps(model, batch)
    assert rows == [2]


def test_a_sliding_window_cache_falls_back_to_the_plain_forward(tokenizer, pair_batch):
    """Mistral's sliding-window cache layers drop old keys: sharing is refused and the model remembered."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        sliding_window=4,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    rows = count_calls(model)
    plain = sequence_logps(model, pair_batch, share_prompt=False)[0]
    rows.clear()
    tried = sequence_logps(model, pair_batch)[0]
    assert rows == [5, 10]  # the prompts' forward, whose cache could not serve, then the plain one
    torch.testing.assert_close(tried, plain, atol=0, rtol=0)
    rows.clear()
    sequence_logps(model, pair_batch)
    assert rows == [10]  # not tried again


def test_dpo_loss_is_the_same_with_a_shared_prompt(tokenizer, pair_batch):
    model = make_model(tokenizer).train()
    ref = torch.randn(5, 2)
    out = {}
    for share in (False, True):
        summed = sequence_logps(model, pair_batch, share_prompt=share)[1]
        loss = dpo_loss(summed[:5], summed[5:], ref[:, 0], ref[:, 1], beta=0.1)[0].mean()
        loss.backward()
        out[share] = (loss.detach(), grads(model))
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-6, rtol=0)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_reward_model_reads_the_same_rewards_and_gradients_with_a_shared_prompt(tokenizer, pair_batch):
    reward_model = RewardModel(make_model(tokenizer), tokenizer, seed=0).train()
    rows = count_calls(reward_model.backbone.get_decoder())
    P = int(pair_batch["prompt_length"])
    out = {}
    for prompt_length in (0, P):
        rows.clear()
        rewards = reward_model(pair_batch["input_ids"], pair_batch["attention_mask"], False, prompt_length)
        (rewards[:5] - rewards[5:]).pow(2).sum().backward()
        out[prompt_length] = (rewards.detach(), grads(reward_model), list(rows))
    assert out[0][2] == [10] and out[P][2] == [5, 10]
    torch.testing.assert_close(out[P][0], out[0][0], atol=1e-5, rtol=0)
    for a, b in zip(out[P][1], out[0][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # a row with an empty response has its last real token in the prompt: the plain forward reads it
    empty = collate([[5, 6, 7], [5, 6, 7]], [[], [8, 2]], tokenizer.pad_token_id)
    rows.clear()
    with torch.no_grad():
        plain = reward_model(empty["input_ids"], empty["attention_mask"], False, 0)
        given = reward_model(empty["input_ids"], empty["attention_mask"], False, 3)
    assert rows == [2, 2]
    torch.testing.assert_close(given, plain, atol=0, rtol=0)


def test_value_model_reads_the_same_values_with_a_shared_prompt(tokenizer, group_batch):
    backbone = make_model(tokenizer).get_decoder()
    head = torch.nn.Linear(backbone.config.hidden_size, 1)
    rows = count_calls(backbone)
    P, mask = int(group_batch["prompt_length"]), group_batch["attention_mask"]
    with torch.no_grad():
        shared = ValueModel(backbone, head)(group_batch)
        hidden = backbone(
            input_ids=group_batch["input_ids"], attention_mask=mask, position_ids=position_ids(mask)
        ).last_hidden_state
    plain = head(hidden[:, P - 1 : -1]).squeeze(-1) * group_batch["completion_mask"]
    assert rows == [2, 6, 6]  # shared: the two prompts, then the six samples; plain: the six rows
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
