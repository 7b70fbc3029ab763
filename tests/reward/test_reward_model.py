"""The reward model: read at the last real token, padding-invariant, trainable, saved and reloaded exactly."""

import pytest
import torch
from conftest import make_model

from preflab.data import TokenizedPair, collate, encode_completion, encode_prompt
from preflab.models import ModelError
from preflab.reward import RewardEnsemble, RewardModel, load_reward, reduce_ensemble
from preflab.reward.train import RewardConfig, train_step

PROMPTS = ["What is the capital of France?", "Add 2 and 3.", "Tell me about owls, please, in a few words."]
RESPONSES = ["Paris.", "The answer is 5, because two plus three makes five.", "Owls hunt at night."]


@pytest.fixture
def rm(tokenizer):
    return RewardModel(make_model(tokenizer), tokenizer, seed=0)


def ids(tokenizer, i):
    return encode_prompt(tokenizer, PROMPTS[i]), encode_completion(tokenizer, RESPONSES[i])


def test_head_init_and_normalisation_buffers(rm):
    d = rm.backbone.config.hidden_size
    assert rm.head.in_features == d and rm.head.out_features == 1
    assert torch.all(rm.head.bias == 0)
    std = rm.head.weight.std().item()
    assert 0.5 / (d + 1) ** 0.5 < std < 1.5 / (d + 1) ** 0.5  # N(0, 1/sqrt(d+1)) over 32 weights
    assert rm.gain.item() == 1.0 and rm.bias.item() == 0.0
    assert "gain" in dict(rm.named_buffers()) and "bias" in dict(rm.named_buffers())


def test_score_ignores_batch_composition_and_padding_side(rm, tokenizer):
    pad = tokenizer.pad_token_id
    p, c = ids(tokenizer, 0)
    full = p + c
    alone = rm(torch.tensor([full]), torch.ones(1, len(full), dtype=torch.long))
    # in the collate layout beside longer rows (left-padded prompt, right-padded completion)
    others = [ids(tokenizer, 1), ids(tokenizer, 2)]
    batch = collate([p] + [o[0] for o in others], [c] + [o[1] for o in others], pad)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # row 0 really is padded
    mixed = rm(batch["input_ids"], batch["attention_mask"])
    # fully left-padded and fully right-padded beside a longer row
    longer = ids(tokenizer, 2)[0] + ids(tokenizer, 2)[1]
    width = len(longer)
    left = torch.tensor([[pad] * (width - len(full)) + full, longer])
    right = torch.tensor([full + [pad] * (width - len(full)), longer])
    mask_left = (torch.arange(width) >= width - len(full)).long()
    mask_right = (torch.arange(width) < len(full)).long()
    ones = torch.ones(width, dtype=torch.long)
    r_left = rm(left, torch.stack([mask_left, ones]))
    r_right = rm(right, torch.stack([mask_right, ones]))
    for got in (mixed[0], r_left[0], r_right[0]):
        torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=1e-5)
    # and the other rows' scores do not depend on row 0
    torch.testing.assert_close(r_left[1], r_right[1], atol=1e-5, rtol=1e-5)


def test_score_is_read_at_the_last_real_token_never_a_pad(rm, tokenizer):
    p, c = ids(tokenizer, 1)
    batch = collate([p, ids(tokenizer, 2)[0]], [c[:3], c], tokenizer.pad_token_id)  # row 0 has trailing pads
    before = rm(batch["input_ids"], batch["attention_mask"])
    scribbled = batch["input_ids"].clone()
    scribbled[batch["attention_mask"] == 0] = tokenizer.eos_token_id  # change every pad position
    torch.testing.assert_close(rm(scribbled, batch["attention_mask"]), before, atol=1e-6, rtol=1e-6)
    # the value is the head applied to the decoder's hidden state at the last real position
    mask = batch["attention_mask"]
    last = int(mask[0].nonzero().max())
    hidden = rm.backbone.get_decoder()(
        input_ids=batch["input_ids"][:1, : last + 1][:, mask[0, : last + 1].bool()]
    ).last_hidden_state
    torch.testing.assert_close(before[0], rm.head(hidden[0, -1]).squeeze(), atol=1e-5, rtol=1e-5)
    # and changing that last real token changes the score
    changed = batch["input_ids"].clone()
    changed[0, last] = tokenizer.bos_token_id
    assert not torch.allclose(rm(changed, mask)[0], before[0])


def pairs(tokenizer, n=4):
    out = []
    for i in range(n):
        p, c = ids(tokenizer, i % 3)
        _, r = ids(tokenizer, (i + 1) % 3)
        out.append(TokenizedPair(p, c, r, margin=0.5 * i, tie=(i == 3)))
    return out


def test_gradient_accumulation_4x1_equals_1x4(tokenizer):
    config = RewardConfig(model="m", data="d", max_grad_norm=0.0, label_smoothing=0.1)
    models = [RewardModel(make_model(tokenizer), tokenizer, seed=0) for _ in range(2)]
    for m, micro in zip(models, (4, 1)):
        m.train()
        optimizer = torch.optim.SGD(m.parameters(), lr=0.5)
        train_step(m, optimizer, pairs(tokenizer), micro, config)
    a, b = (dict(m.named_parameters()) for m in models)
    moved = [
        name
        for name in a
        if not torch.equal(
            a[name], dict(RewardModel(make_model(tokenizer), tokenizer, seed=0).named_parameters())[name]
        )
    ]
    assert moved  # the step did something
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_every_parameter_of_head_and_backbone_changes(rm, tokenizer):
    before = {n: p.detach().clone() for n, p in rm.named_parameters()}
    rm.train()
    optimizer = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    train_step(rm, optimizer, pairs(tokenizer, 3), 3, RewardConfig(model="m", data="d"))
    unchanged = [n for n, p in rm.named_parameters() if torch.equal(p, before[n])]
    # Bradley-Terry sees only r_w - r_l, so the head's bias gets exactly zero gradient and stays 0: the offset
    # is set afterwards by normalisation. Every other parameter, head and backbone, must move.
    assert unchanged == ["head.bias"]
    assert any(n.startswith("head.") for n in before) and any(n.startswith("backbone.") for n in before)


def test_normalisation_makes_reference_rewards_mean_0_std_1(rm, tokenizer):
    prompts_ids = [ids(tokenizer, i)[0] for i in range(3)] * 2
    completions = [ids(tokenizer, i)[1] for i in range(3)] + [ids(tokenizer, (i + 1) % 3)[1] for i in range(3)]
    raw = rm.score_ids(prompts_ids, completions, normalise=False)
    rm.set_normalisation(raw, "test")
    normalised = rm.score_ids(prompts_ids, completions)
    assert normalised.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert normalised.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(normalised, (raw - raw.mean()) / raw.std(unbiased=False), atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_gives_identical_scores(rm, tokenizer, tmp_path):
    rm.set_normalisation(torch.tensor([0.3, -1.0, 2.0]), "test")
    rm.max_prompt_length, rm.max_completion_length = 16, 8
    before = rm.reward(PROMPTS, RESPONSES)
    rm.save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm")
    torch.testing.assert_close(loaded.reward(PROMPTS, RESPONSES), before, atol=0, rtol=0)
    assert (loaded.max_prompt_length, loaded.max_completion_length) == (16, 8)
    # the one reward interface gives the same numbers
    torch.testing.assert_close(load_reward(str(tmp_path / "rm"))(PROMPTS, RESPONSES), before, atol=0, rtol=0)
    # and score(texts) works on whole strings
    assert loaded.score([PROMPTS[0] + RESPONSES[0]]).shape == (1,)


def test_reward_matches_forward_on_prompt_and_completion_ids(rm, tokenizer):
    got = rm.reward(PROMPTS, RESPONSES)
    for i in range(3):
        p, c = ids(tokenizer, i)
        alone = rm(torch.tensor([p + c]), torch.ones(1, len(p) + len(c), dtype=torch.long))
        torch.testing.assert_close(got[i], alone[0], atol=1e-5, rtol=1e-5)


def test_ensemble_reductions():
    rewards = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 1.0]])  # [K=3, N=2]
    torch.testing.assert_close(reduce_ensemble(rewards, "mean"), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(reduce_ensemble(rewards, "min"), torch.tensor([1.0, 0.0]))
    std = (2 / 3) ** 0.5  # population std of (1, 3, 2) and of (2, 0, 1)
    torch.testing.assert_close(
        reduce_ensemble(rewards, "mean_minus_std", lam=2.0), torch.tensor([2.0 - 2 * std, 1.0 - 2 * std])
    )
    with pytest.raises(ValueError, match="reduction"):
        reduce_ensemble(rewards, "median")


def test_ensemble_reward_reduces_member_rewards(tokenizer, tmp_path):
    members = [RewardModel(make_model(tokenizer, seed=k), tokenizer, seed=k) for k in range(3)]
    each = torch.stack([m.reward(PROMPTS, RESPONSES) for m in members])
    ensemble = RewardEnsemble(members, reduce="min")
    torch.testing.assert_close(ensemble.reward(PROMPTS, RESPONSES), each.min(0).values)
    ensemble.save(tmp_path / "ens")
    fn = load_reward(str(tmp_path / "ens"))
    torch.testing.assert_close(fn(PROMPTS, RESPONSES), each.min(0).values, atol=0, rtol=0)
    with pytest.raises(ModelError, match="ensemble"):
        RewardModel.load(tmp_path / "ens")


def test_a_backbone_that_is_not_a_causal_lm_is_refused(tokenizer):
    from transformers import LlamaModel

    with pytest.raises(ModelError, match="causal-LM"):
        RewardModel(LlamaModel(make_model(tokenizer).config), tokenizer)


def test_train_layers_freezes_everything_below_the_top_layers(rm, tokenizer):
    from preflab.reward.train import freeze_lower_layers

    freeze_lower_layers(rm, 1)
    before = {n: p.detach().clone() for n, p in rm.named_parameters()}
    rm.train()
    optimizer = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-3)
    train_step(rm, optimizer, pairs(tokenizer, 3), 3, RewardConfig(model="m", data="d"))
    moved = {n for n, p in rm.named_parameters() if not torch.equal(p, before[n])}
    top = {n for n in before if n.startswith("backbone.model.layers.1.") or n == "backbone.model.norm.weight"}
    assert moved == top | {"head.weight"}


def test_a_backbone_loaded_from_gguf_still_saves(tokenizer, tmp_path):
    """`load_model("smollm2")` leaves transformers' GGUF quantizer on the model, which refuses save_pretrained."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    backbone = make_model(tokenizer)
    backbone.hf_quantizer = GgufHfQuantizer(GgufConfig())
    backbone.config.quantization_config = GgufConfig()
    with pytest.raises(ValueError, match="not serializable"):
        backbone.save_pretrained(tmp_path / "plain")
    rm = RewardModel(backbone, tokenizer, seed=0)
    rm.save(tmp_path / "rm")
    torch.testing.assert_close(
        RewardModel.load(tmp_path / "rm").reward(PROMPTS, RESPONSES), rm.reward(PROMPTS, RESPONSES)
    )
