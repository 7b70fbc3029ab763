"""PPO's value model (the critic): V(s_t) for each completion token, from a causal-LM backbone and a scalar head.

Two starts (`--value-init`):
  * "policy" (default): a copy of the policy's backbone and a zero-initialised head, so V = 0 at step 0 and the
    first advantages are the plain whitened returns. Needs nothing but the policy, so it works with any reward
    (a Python function has no backbone to copy).
  * "reward": backbone and head of a trained reward model (Stiennon et al. 2020; InstructGPT; RLHF detail #9),
    whose features already describe the reward. The reward model's normalisation (r = gain * head(h) + bias) is
    folded into the copied head, so the critic starts on the scale of the normalised rewards PPO optimises;
    with value clipping a critic on another scale could move only ~cliprange per batch towards it. The critic
    reads the policy's token ids, so the reward model's tokenizer must be the policy's.

The critic is saved beside the policy (`value_model/`: the backbone as a HF directory plus `value_head.safetensors`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from preflab.data.tokenize import position_ids
from preflab.logps import shared_prompt_forward

HEAD_FILE = "value_head.safetensors"


class ValueModel(nn.Module):
    """V(s_t) for each completion token: a decoder backbone and a scalar head on the state before the token."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, batch: dict) -> torch.Tensor:
        P = int(batch["prompt_length"])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        T = ids.shape[1]
        # the states before completion tokens P..T-1; samples of one prompt run it once (preflab.logps)
        shared = shared_prompt_forward(self.backbone, ids, mask, P, T - 1, {}, {})
        if shared is not None:
            head, inverse, rest = shared
            states = torch.cat([head.last_hidden_state[inverse, -1:], rest.last_hidden_state], 1)
        else:
            hidden = self.backbone(
                input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False
            ).last_hidden_state
            states = hidden[:, P - 1 : T - 1]
        values = self.head(states).squeeze(-1)  # state before completion token t
        return values * batch["completion_mask"].to(values.dtype)


def same_tokenizer(a, b) -> bool:
    """Do two tokenizers map text to the same ids (same vocabulary and special tokens)?"""
    specials = ("pad_token_id", "bos_token_id", "eos_token_id")
    return a.get_vocab() == b.get_vocab() and all(getattr(a, s) == getattr(b, s) for s in specials)


def folded_head(head: nn.Linear, gain: float, bias: float) -> nn.Linear:
    """A copy of `head` computing gain * head(h) + bias: the reward model's normalisation folded in."""
    out = copy.deepcopy(head).float()
    with torch.no_grad():
        out.weight.mul_(gain)
        out.bias.mul_(gain).add_(bias)
    return out


def make_value_model(policy, tokenizer, value_init: str, path: str = "") -> ValueModel:
    """The critic for `value_init` "policy" (zero head on a policy copy) or "reward" (the reward model at `path`;
    of an ensemble, its first member)."""
    from preflab.models import ModelError

    if value_init == "reward":
        from preflab.reward.model import ENSEMBLE_FILE, RewardModel, reward_dir

        if not Path(path).is_dir():
            raise ModelError(
                f"value_init=reward needs a reward-model folder in --value-model or --reward, got {path!r}"
            )
        directory = reward_dir(path)
        if (directory / ENSEMBLE_FILE).exists():
            path = directory / json.loads((directory / ENSEMBLE_FILE).read_text())["members"][0]
        rm = RewardModel.load(path)
        if not same_tokenizer(rm.tokenizer, tokenizer):
            raise ModelError(
                f"value_init=reward: the reward model at {path} has another tokenizer than the policy; "
                "the critic reads the policy's token ids (use --value-init policy)"
            )
        head = folded_head(rm.head, float(rm.gain), float(rm.bias))
        return ValueModel(copy.deepcopy(rm.backbone).get_decoder(), head).float()
    head = nn.Linear(policy.config.hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return ValueModel(copy.deepcopy(policy.get_decoder()), head)


def save_value_model(value_model: ValueModel, directory: str | Path) -> Path:
    """The backbone as a HF directory and the head beside it (loaded back by `load_value_model`)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    value_model.backbone.save_pretrained(directory)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in value_model.head.state_dict().items()}, directory / HEAD_FILE
    )
    return directory


def load_value_model(directory: str | Path) -> ValueModel:
    from safetensors.torch import load_file
    from transformers import AutoModel

    directory = Path(directory)
    backbone = AutoModel.from_pretrained(directory)
    state = load_file(directory / HEAD_FILE)
    head = nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    return ValueModel(backbone, head)
