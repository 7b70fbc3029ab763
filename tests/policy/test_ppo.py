"""PPO: the first-step checks, micro-batch accumulation, every parameter moving, and the CLI end to end."""

import copy
import json

import pytest
import torch
from conftest import make_model

from preflab.adapters import frozen_copy
from preflab.config import ConfigError
from preflab.data import encode_prompt
from preflab.data.tokenize import take
from preflab.logps import chunked_logps
from preflab.policy.losses import gae, masked_whiten, rlhf_rewards
from preflab.policy.online import PromptCycle, load_prompt_sets, score_responses
from preflab.policy.ppo import PPOConfig, ppo_minibatch
from preflab.policy.value import load_value_model, make_value_model
from preflab.rollout import generate
from preflab.runs import read_metrics
from preflab.world import prompts as world_prompts

REWARD = "preflab.world.rewards:length_closeness"


def config(**kw):
    base = dict(model="m", reward=REWARD, batch_size=4, mini_batch_size=4, micro_batch_size=4, max_new_tokens=6)
    return PPOConfig(**{**base, **kw})


def ppo_data(model, tokenizer, value_model, n=4, seed=0):
    """A rollout batch in the shape the PPO loop builds (steps 1-6), with a non-trivial score."""
    prompts = world_prompts(n, seed=seed)
    rollout = generate(
        model,
        tokenizer,
        [encode_prompt(tokenizer, p) for p in prompts],
        6,
        generator=torch.Generator().manual_seed(seed),
    )
    batch = rollout.batch
    mask = batch["completion_mask"].float()
    with torch.no_grad():
        old = chunked_logps(model, batch, 1.0, 2)
        values = value_model(batch)
    scores = torch.linspace(-1, 1, n)
    rewards, kl = rlhf_rewards(old, old, scores, mask, 0.1)
    adv, ret = gae(rewards, values, mask, 1.0, 0.95)
    return {**batch, "old_logps": old, "old_values": values, "advantages": masked_whiten(adv, mask), "returns": ret}


def loaded_with_dropout(model, tokenizer, tmp_path):
    """A model whose config asks for dropout, saved and loaded the way every stage loads one (`load_model`)."""
    from preflab.models import load_model

    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.attention_dropout == 0.0  # what the config asked for is switched off
    return loaded


def test_first_minibatch_ratio_is_one_and_approxkl_zero(tokenizer, micro_model_with_dropout, tmp_path):
    model = loaded_with_dropout(micro_model_with_dropout, tokenizer, tmp_path)
    value = make_value_model(model, tokenizer, "policy")
    data = ppo_data(model, tokenizer, value)
    model.train()
    stats = ppo_minibatch(model, value, take(data, torch.tensor([2, 0, 3, 1])), config(micro_batch_size=2))
    assert stats["ratio_max_dev"] < 1e-6
    assert stats["policy/approxkl"] / stats["tokens"] < 1e-12
    assert stats["policy/clipfrac"] == 0.0


def test_zero_init_value_head_starts_at_zero_and_is_a_copy(tokenizer, model):
    value = make_value_model(model, tokenizer, "policy")
    data = ppo_data(model, tokenizer, value)
    assert torch.equal(data["old_values"], torch.zeros_like(data["old_values"]))
    assert value.backbone is not model.get_decoder()
    for a, b in zip(value.backbone.parameters(), model.get_decoder().parameters()):
        assert torch.equal(a, b)


def _grads(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def test_micro_batch_accumulation_4x1_equals_1x4(tokenizer):
    policy = make_model(tokenizer, seed=1)
    value = make_value_model(policy, tokenizer, "policy")
    torch.nn.init.normal_(value.head.weight, std=0.5)  # a live critic, so the value loss has gradients too
    data = ppo_data(policy, tokenizer, value)
    data["old_logps"] = data["old_logps"] - 0.05 * torch.arange(4.0)[:, None] * data["completion_mask"]  # ratio != 1
    p1, v1 = copy.deepcopy(policy).train(), copy.deepcopy(value)
    p4, v4 = copy.deepcopy(policy).train(), copy.deepcopy(value)
    s1 = ppo_minibatch(p1, v1, data, config(micro_batch_size=1))
    s4 = ppo_minibatch(p4, v4, data, config(micro_batch_size=4))
    for a, b in zip(_grads(p1) + _grads(v1), _grads(p4) + _grads(v4)):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert s1["loss/policy"] == pytest.approx(s4["loss/policy"], rel=1e-5)
    assert any(g.abs().sum() > 0 for g in _grads(v4))


def test_every_policy_parameter_changes_after_a_ppo_step(tokenizer):
    policy = make_model(tokenizer, seed=2).train()
    value = make_value_model(policy, tokenizer, "policy")
    data = ppo_data(policy, tokenizer, value)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    optimizer = torch.optim.AdamW([*policy.parameters(), *value.parameters()], lr=1e-3)
    ppo_minibatch(policy, value, data, config(micro_batch_size=2))
    optimizer.step()
    unchanged = [n for n, p in policy.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_config_validation_quotes_the_bad_value():
    with pytest.raises(ConfigError, match="'k2'"):
        config(kl_estimator="k2")
    with pytest.raises(ConfigError, match=r"\(6\).*\(4\)"):
        config(batch_size=6, mini_batch_size=4)
    with pytest.raises(ConfigError, match="'critic'"):
        config(value_init="critic")


def test_prompt_file_errors_name_file_and_line_and_hold_out_the_last_rows(tmp_path):
    from preflab.data.preferences import DataError

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2"):
        load_prompt_sets(str(path), 10, 1, 0)
    path.write_text('{"prompt": "hi"}\n{"prompt": "a"}\n{"prompt": [{"role": "user", "content": "x"}]}\n')
    train, held = load_prompt_sets(str(path), 10, 1, 0)
    assert train == ["hi", "a"] and held == [[{"role": "user", "content": "x"}]]
    with pytest.raises(ConfigError, match="too few"):
        load_prompt_sets(str(path), 10, 3, 0)


def test_value_init_from_reward_model_starts_at_the_normalised_reward(tokenizer, tmp_path):
    from preflab.reward.model import RewardModel

    rm = RewardModel(make_model(tokenizer, seed=3), tokenizer, seed=0)
    rm.gain.fill_(2.5)  # a normalisation that is not the identity
    rm.bias.fill_(-0.7)
    rm.save(tmp_path / "rm")
    rm = RewardModel.load(tmp_path / "rm")
    policy = make_model(tokenizer)
    value = make_value_model(policy, tokenizer, "reward", str(tmp_path / "rm"))
    for a, b in zip(value.backbone.parameters(), rm.backbone.get_decoder().parameters()):
        assert torch.equal(a, b)
    # V(s_t) reads the state before completion token t: the normalised reward of the prompt + the first t tokens
    prompts = world_prompts(3, seed=1)
    rollout = generate(
        policy, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], 6, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        values = value(rollout.batch)
    for i, prompt in enumerate(prompts):
        p_ids, c_ids = encode_prompt(tokenizer, prompt), rollout.completion_ids[i]
        expected = rm.score_ids([p_ids] * len(c_ids), [c_ids[:t] for t in range(len(c_ids))])
        assert torch.allclose(values[i, : len(c_ids)], expected, atol=1e-5)


def test_value_init_from_an_ensemble_takes_its_first_member(tokenizer, tmp_path):
    from preflab.reward.model import RewardModel, write_ensemble_index

    for k in range(2):
        RewardModel(make_model(tokenizer, seed=3 + k), tokenizer, seed=k).save(tmp_path / "ens" / f"member-{k}")
    write_ensemble_index(tmp_path / "ens", ["member-1", "member-0"], "min")
    value = make_value_model(make_model(tokenizer), tokenizer, "reward", str(tmp_path / "ens"))
    first = RewardModel.load(tmp_path / "ens" / "member-1")
    assert all(
        torch.equal(a, b) for a, b in zip(value.backbone.parameters(), first.backbone.get_decoder().parameters())
    )


def test_value_init_from_a_reward_model_with_another_tokenizer_is_refused(tokenizer, tmp_path):
    from preflab.models import ModelError, train_tokenizer
    from preflab.reward.model import RewardModel

    other = train_tokenizer(["a b c d e f g h"] * 50, vocab_size=280)
    RewardModel(make_model(tokenizer, seed=3), other, seed=0).save(tmp_path / "rm")
    with pytest.raises(ModelError, match="another tokenizer"):
        make_value_model(make_model(tokenizer), tokenizer, "reward", str(tmp_path / "rm"))


def test_value_model_saves_and_loads_back(tokenizer, tmp_path):
    from preflab.policy.value import save_value_model

    value = make_value_model(make_model(tokenizer), tokenizer, "policy")
    torch.nn.init.normal_(value.head.weight, std=0.5)
    data = ppo_data(make_model(tokenizer), tokenizer, value)
    save_value_model(value, tmp_path / "v")
    loaded = load_value_model(tmp_path / "v").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(data), value(data), atol=1e-6)


@pytest.mark.slow
def test_ppo_cli_writes_a_loadable_policy_and_every_metric(model_dir, tmp_path):
    from preflab.cli import main
    from preflab.models import load_model

    out = tmp_path / "ppo"
    rc = main(
        [
            "ppo",
            "--model",
            str(model_dir),
            "--reward",
            REWARD,
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            "--mini-batch-size",
            "4",
            "--micro-batch-size",
            "2",
            "--epochs",
            "2",
            "--max-new-tokens",
            "6",
            "--eval-prompts",
            "4",
            "--target-kl",
            "1",
            "--horizon",
            "100",
            "--checkpoint-every",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rows = read_metrics(out)
    first = rows[0]
    assert first["ppo/objective/kl"] == 0.0  # policy == reference at step 1
    assert first["ppo/policy/first_ratio_dev"] < 1e-6  # detail #17
    assert first["ppo/objective/rlhf_reward"] == pytest.approx(first["ppo/objective/scores"])
    for name in (
        "ppo/objective/entropy",
        "ppo/policy/approxkl",
        "ppo/policy/clipfrac",
        "ppo/val/ratio",
        "ppo/val/explained_variance",
        "ppo/val/clipfrac",
        "ppo/loss/policy",
        "ppo/loss/value",
        "ppo/beta",
        "ppo/rollout/length",
        "ppo/rollout/eos_rate",
    ):
        assert name in first, name
    assert rows[1]["ppo/beta"] != first["ppo/beta"]  # the adaptive controller moved beta
    assert "ppo/eval/reward" in rows[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "eval_reward_after" in summary
    state = torch.load(out / "checkpoints" / "step-00000002" / "trainer_state.pt", weights_only=False)
    assert {g["weight_decay"] for g in state["optimizer"]["param_groups"]} == {0.0}  # as every other stage
    assert summary["value_model"] == str(out / "value_model")
    value = load_value_model(out / "value_model")  # the critic is saved with the policy
    assert not torch.equal(value.head.weight, torch.zeros_like(value.head.weight))
    trained, _ = load_model(out)  # a later stage takes the run folder
    original, _ = load_model(model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), original.parameters()))


def test_kl_is_zero_when_policy_is_the_reference_and_eos_penalty_hits_unfinished_rows(
    tokenizer, micro_model_with_dropout, tmp_path
):
    model = loaded_with_dropout(micro_model_with_dropout, tokenizer, tmp_path)
    prompts = world_prompts(6, seed=3)
    rollout = generate(
        model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], 5, generator=torch.Generator().manual_seed(3)
    )
    ref = frozen_copy(model)
    assert all(not p.requires_grad for p in ref.parameters())
    model.train()  # as in the PPO epochs: dropout would show here
    mask = rollout.batch["completion_mask"].float()
    logp, ref_logp = chunked_logps(model, rollout.batch, 0.7, 4), chunked_logps(ref, rollout.batch, 0.7, 3)
    for estimator in ("k1", "k3"):
        _, kl = rlhf_rewards(logp, ref_logp, torch.zeros(6), mask, 0.1, estimator)
        assert torch.equal(kl, torch.zeros_like(kl))
    finished = torch.tensor([True, False, True, False, True, True])
    rollout.finished = finished
    scores = score_responses(lambda p, r: torch.ones(len(r)), prompts, rollout, missing_eos_penalty=2.0)
    assert scores.tolist() == [1.0, -1.0, 1.0, -1.0, 1.0, 1.0]


def test_prompt_cycle_visits_every_prompt_once_per_pass():
    batches = PromptCycle(list(range(10)), 4, torch.Generator().manual_seed(0))
    first = [x for _ in range(5) for x in next(batches)]  # 20 = two passes
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))


def test_monitor_ensemble_logs_disagreement_and_true_utility_every_step(model_dir, ensemble_dir, tmp_path):
    from preflab.cli import main

    out = tmp_path / "ppo"
    args = ["ppo", "--model", str(model_dir), "--reward", REWARD, "--monitor-ensemble", str(ensemble_dir)]
    args += ["--max-steps", "3", "--batch-size", "4", "--mini-batch-size", "4", "--micro-batch-size", "4"]
    assert main(args + ["--epochs", "1", "--max-new-tokens", "6", "--eval-prompts", "2", "--out", str(out)]) == 0
    steps = [row for row in read_metrics(out) if "ppo/objective/kl" in row]
    assert len(steps) == 3
    for row in steps:
        assert row["ppo/ensemble/disagreement"] > 0  # two random members: never in agreement
        assert "ppo/true_utility" in row  # world prompts: the samples' true utility beside it
    assert steps[0]["ppo/ensemble/disagreement"] != steps[1]["ppo/ensemble/disagreement"]  # new samples each step


def test_watch_samples_is_the_mean_member_std_and_the_mean_true_utility(ensemble_dir):
    from types import SimpleNamespace

    from preflab.policy.online import watch_samples
    from preflab.reward.model import RewardEnsemble

    ensemble = RewardEnsemble.load(ensemble_dir)
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]] * 2
    texts = ["2 + 3 = 5.", "Ugh, obviously. 2 + 3 = 4."]  # true utility 1 and -1 - 0.5
    got = watch_samples(SimpleNamespace(world=True, monitor=ensemble), prompts, texts)
    each = torch.stack([m.reward(prompts, texts) for m in ensemble.members])  # [2 members, 2 samples]
    expected = ((each[0] - each[1]).abs() / 2).mean().item()  # population std of two values: |a - b| / 2
    assert got["ensemble/disagreement"] == pytest.approx(expected, rel=1e-5)
    assert got["true_utility"] == pytest.approx(-0.25)
    assert watch_samples(SimpleNamespace(world=False, monitor=None), prompts, texts) == {}


def test_monitor_ensemble_refuses_a_single_reward_model(tokenizer, tmp_path):
    from preflab.policy.online import load_monitor
    from preflab.reward.model import RewardModel

    RewardModel(make_model(tokenizer), tokenizer, seed=0).save(tmp_path / "rm")
    with pytest.raises(ConfigError, match="not an ensemble"):
        load_monitor(str(tmp_path / "rm"), torch.device("cpu"))
