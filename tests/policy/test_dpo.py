"""DPO family: the loss against hand-computed values, the trainer's equivalences, and the CLI end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_model

from preflab.data import collate_pairs, tokenize_rows
from preflab.data.preferences import parse_preference
from preflab.policy import dpo_loss
from preflab.policy.dpo import (
    LOSS_TYPES,
    DPOConfig,
    Reference,
    accumulate_gradients,
    batch_loss,
    pair_logps,
    reference_logps,
    train_dpo,
)
from preflab.world.annotators import annotator_pool, simulate_votes, world_pairs

LN2 = math.log(2.0)


def world_rows(n: int, seed: int = 0):
    votes = simulate_votes(world_pairs(n, seed=seed), annotator_pool(4, seed=seed), seed=seed)
    return [parse_preference(v, f"test:{i + 1}") for i, v in enumerate(votes)]


# ---- the loss --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_type,eps,expected",
    [
        ("sigmoid", 0.0, LN2),  # -log sigmoid(0)
        ("sigmoid", 0.2, LN2),  # 0.8 log 2 + 0.2 log 2
        ("robust", 0.2, LN2),  # (0.8 log 2 - 0.2 log 2) / 0.6
        ("ipo", 0.0, 1 / (2 * 0.25) ** 2),  # (0 - 1/(2 beta))^2 = 4 at beta 0.25
        ("hinge", 0.0, 1.0),  # relu(1 - 0)
    ],
)
def test_loss_when_policy_equals_reference(loss_type, eps, expected):
    logps = torch.tensor([-3.0, -7.5, -1.25])
    other = torch.tensor([-2.0, -9.0, -4.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        logps, other, logps, other, beta=0.25, loss_type=loss_type, label_smoothing=eps
    )
    assert losses.shape == (3,)
    assert torch.allclose(losses, torch.full((3,), expected))
    assert torch.equal(chosen_rewards, torch.zeros(3)) and torch.equal(rejected_rewards, torch.zeros(3))


# A batch of 2, beta 0.5: chosen log-ratios (0.5, 0), rejected log-ratios (-0.5, 0.5), so h = (1, -0.5),
# beta h = (0.5, -0.25).
BATCH = dict(
    policy_chosen_logps=torch.tensor([-1.0, -2.0]),
    policy_rejected_logps=torch.tensor([-3.0, -1.0]),
    ref_chosen_logps=torch.tensor([-1.5, -2.0]),
    ref_rejected_logps=torch.tensor([-2.5, -1.5]),
)
SP = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus(x) = -log sigmoid(-x)


@pytest.mark.parametrize(
    "loss_type,eps,expected",
    [
        ("sigmoid", 0.0, [0.4740769842, 0.8259394199]),  # softplus(-0.5), softplus(0.25)
        ("sigmoid", 0.1, [0.9 * SP(-0.5) + 0.1 * SP(0.5), 0.9 * SP(0.25) + 0.1 * SP(-0.25)]),  # 0.52408, 0.80094
        (
            "robust",
            0.1,
            [(0.9 * SP(-0.5) - 0.1 * SP(0.5)) / 0.8, (0.9 * SP(0.25) - 0.1 * SP(-0.25)) / 0.8],
        ),  # 0.41158, 0.85719
        ("ipo", 0.0, [0.0, 2.25]),  # (1 - 1)^2, (-0.5 - 1)^2
        ("hinge", 0.0, [0.5, 1.25]),  # relu(1 - 0.5), relu(1 + 0.25)
    ],
)
def test_loss_hand_computed_batch_of_two(loss_type, eps, expected):
    losses, chosen_rewards, rejected_rewards = dpo_loss(**BATCH, beta=0.5, loss_type=loss_type, label_smoothing=eps)
    assert torch.allclose(losses, torch.tensor(expected), atol=1e-6)
    assert torch.allclose(losses.mean(), torch.tensor(sum(expected) / 2), atol=1e-6)
    assert torch.allclose(chosen_rewards, torch.tensor([0.25, 0.0]))
    assert torch.allclose(rejected_rewards, torch.tensor([-0.25, 0.25]))


def test_rewards_are_detached_and_loss_is_not():
    policy = BATCH["policy_chosen_logps"].clone().requires_grad_(True)
    losses, chosen_rewards, _ = dpo_loss(
        policy, BATCH["policy_rejected_logps"], BATCH["ref_chosen_logps"], BATCH["ref_rejected_logps"], beta=0.5
    )
    assert losses.requires_grad and not chosen_rewards.requires_grad
    losses.mean().backward()
    # d/dx of mean softplus(-beta h) wrt the chosen log-prob: -beta sigmoid(-beta h) / 2
    assert torch.allclose(policy.grad, torch.tensor([-0.5 / (1 + math.exp(0.5)), -0.5 / (1 + math.exp(-0.25))]) / 2)


def test_unknown_loss_type_and_bad_config():
    from preflab.config import ConfigError

    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*BATCH.values(), loss_type="nope")
    with pytest.raises(ConfigError, match="'nope'"):
        DPOConfig(loss_type="nope")
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        DPOConfig(batch_size=4, micro_batch_size=3)
    with pytest.raises(ConfigError, match="0.6"):
        DPOConfig(label_smoothing=0.6)


# ---- the trainer's pieces --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tokenizer):
    return tokenize_rows(tokenizer, world_rows(12), 64, 32)[0]


def test_chosen_and_rejected_in_one_pass_their_prompt_once(tokenizer, model, pairs):
    rows = []
    model.register_forward_pre_hook(lambda m, a, k: rows.append(k["input_ids"].shape), with_kwargs=True)
    batch = collate_pairs(pairs[:4], tokenizer.pad_token_id)
    chosen, rejected = pair_logps(model, batch)
    P, T = int(batch["prompt_length"]), batch["input_ids"].shape[1]
    # the 4 prompts once, then the 8 responses (but the last column, whose logits predict nothing) over their cache
    assert rows == [(4, P), (8, T - P - 1)] and chosen.shape == rejected.shape == (4,)
    # chosen rows first: row 0 of the batch is pair 0's chosen response, row 4 its rejected one
    single = collate_pairs(pairs[:1], tokenizer.pad_token_id)
    c0, r0 = pair_logps(model, single)
    assert torch.allclose(c0, chosen[:1], atol=1e-5) and torch.allclose(r0, rejected[:1], atol=1e-5)
    normalised, _ = pair_logps(model, batch, length_normalize=True)
    lengths = batch["completion_mask"].sum(-1)[:4]
    assert torch.allclose(normalised * lengths, chosen, atol=1e-5)


def grads_after(model, pairs, reference, pad_id, config):
    model.zero_grad()
    accumulate_gradients(model, pairs, [0, 1, 2, 3], reference, pad_id, config)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulation_4x1_equals_1x4(tokenizer, pairs):
    pad = tokenizer.pad_token_id
    ref = Reference(reference_logps(make_model(tokenizer, seed=1), pairs, pad, 4))
    model = make_model(tokenizer)
    whole = grads_after(model, pairs, ref, pad, DPOConfig(batch_size=4, micro_batch_size=4))
    split = grads_after(model, pairs, ref, pad, DPOConfig(batch_size=4, micro_batch_size=1))
    assert any(g.abs().sum() > 0 for g in whole.values())
    for name in whole:
        assert torch.allclose(whole[name], split[name], atol=1e-6, rtol=1e-4), name


def test_precomputed_reference_equals_on_the_fly(tokenizer, pairs):
    pad = tokenizer.pad_token_id
    reference_model, config = make_model(tokenizer, seed=1), DPOConfig(batch_size=4, micro_batch_size=2)
    table = Reference(reference_logps(reference_model, pairs, pad, 3))
    live = Reference(model=reference_model)
    model = make_model(tokenizer)
    batch = collate_pairs(pairs[4:8], pad)
    loss_table, m_table = batch_loss(model, batch, table([4, 5, 6, 7], batch), config)
    loss_live, m_live = batch_loss(model, batch, live([4, 5, 6, 7], batch), config)
    assert torch.allclose(loss_table, loss_live, atol=1e-6)
    assert m_table["rewards/margins"] == pytest.approx(m_live["rewards/margins"], abs=1e-5)
    g_table, g_live = grads_after(model, pairs, table, pad, config), grads_after(model, pairs, live, pad, config)
    assert all(torch.allclose(g_table[n], g_live[n], atol=1e-6) for n in g_table)


def test_rpo_term_adds_the_chosen_per_token_nll(tokenizer, model, pairs):
    batch = collate_pairs(pairs[:3], tokenizer.pad_token_id)
    ref = torch.tensor([[-20.0, -25.0], [-18.0, -19.0], [-30.0, -22.0]])
    plain, _ = batch_loss(model, batch, ref, DPOConfig())
    with_rpo, metrics = batch_loss(model, batch, ref, DPOConfig(rpo_alpha=0.5))
    chosen, _ = pair_logps(model, batch)
    nll = -(chosen / batch["completion_mask"].sum(-1)[:3]).mean()
    assert metrics["nll_loss"] == pytest.approx(nll.item(), rel=1e-5)
    assert torch.allclose(with_rpo, plain + 0.5 * nll, atol=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_one_step_moves_every_parameter(tokenizer, loss_type):
    model = make_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = DPOConfig(
        loss_type=loss_type,
        label_smoothing=0.1 if loss_type in ("sigmoid", "robust") else 0.0,
        batch_size=4,
        max_steps=1,
        warmup=0.0,
        held_out=0.0,
        lr=1e-2,
        max_completion_length=32,
    )
    summary = train_dpo(model, tokenizer, world_rows(8), config)
    assert summary["steps"] == 1
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach().cpu(), before[n].cpu())]
    assert unchanged == []


def test_ties_are_skipped_and_counted(tokenizer):
    rows = world_rows(10)
    rows[0].tie = rows[3].tie = True
    summary = train_dpo(make_model(tokenizer), tokenizer, rows, DPOConfig(batch_size=4, max_steps=1, held_out=0.0))
    assert summary["ties_skipped"] == 2 and summary["train_pairs"] == len(rows) - 2


def test_eval_rows_hold_out_nothing_from_the_training_rows(tokenizer):
    rows, held = world_rows(10), world_rows(6, seed=1)
    held[2].tie = True  # a tie is never a held-out pair either
    config = DPOConfig(batch_size=4, max_steps=1, held_out=0.2, eval_every=0)
    split = train_dpo(make_model(tokenizer), tokenizer, rows, config)
    given = train_dpo(make_model(tokenizer), tokenizer, rows, config, eval_rows=held)
    assert (split["train_pairs"], split["eval_pairs"]) == (8, 2)
    assert (given["train_pairs"], given["eval_pairs"]) == (10, 5)
    assert math.isfinite(given["eval_loss"])


# ---- the CLI -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_smoke(model_dir, tmp_path, capsys):
    from preflab.cli import main
    from preflab.models import load_model
    from preflab.runs import read_metrics

    votes = simulate_votes(world_pairs(24), annotator_pool(3), seed=0)
    votes[0]["tie"] = True
    data = tmp_path / "votes.jsonl"
    data.write_text("".join(json.dumps(v) + "\n" for v in votes))
    out = tmp_path / "run"
    rc = main(
        [
            "dpo",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-steps",
            "4",
            "--batch-size",
            "4",
            "--micro-batch-size",
            "2",
            "--eval-every",
            "2",
            "--log-every",
            "1",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["ties_skipped"] == 1 and summary["eval_pairs"] > 0
    assert math.isfinite(summary["eval_loss"]) and "true_utility_gain" not in summary
    names = set().union(*read_metrics(out))
    for name in (
        "dpo/loss",
        "dpo/rewards/chosen",
        "dpo/rewards/rejected",
        "dpo/rewards/margins",
        "dpo/rewards/accuracies",
        "dpo/logps/chosen",
        "dpo/logps/rejected",
        "dpo/eval/loss",
        "dpo/eval/rewards/accuracies",
    ):
        assert name in names, name
    assert not any(name.startswith("dpo/world/") for name in names)  # that is `preflab eval policy`'s job
    trained, _ = load_model(out)
    start, _ = load_model(model_dir)
    assert not torch.equal(trained.model.embed_tokens.weight, start.model.embed_tokens.weight)
    assert main(["dpo", "--model", str(model_dir), "--data", str(data), "--beta", "-1"]) == 2
    assert "beta must be > 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as gone:  # the private world evaluation is gone: `preflab eval policy` does it
        main(["dpo", "--model", str(model_dir), "--data", str(data), "--eval-world-prompts", "4"])
    assert gone.value.code == 2
