"""The reward model: a causal-LM backbone plus a scalar head read at the last real token, normalised.

    r(x, y) = gain * head(h_last(x ++ y)) + bias

  * `backbone` is a `transformers` causal LM (kept whole, LM head included, so PPO can initialise its value
    model from it and the folder still loads as a language model); its decoder's final hidden state is read
    at `last_token_index(attention_mask)`: the last real token (EOS for a complete response), never a pad,
    whatever the padding side. Position ids are `cumsum(mask) - 1`, so padding never moves a real token.
  * `head` is `nn.Linear(d_model, 1)` with weight ~ N(0, 1/sqrt(d_model + 1)) and bias 0 (Stiennon et al.
    2020; "N implementation details of RLHF", detail 6).
  * `gain`/`bias` are buffers set after training so that reference responses score mean 0, std 1
    (detail 7); they are 1 and 0 while training, so training sees the raw head output.

A saved reward model is a Hugging Face directory of the backbone and tokenizer, plus `reward_head.safetensors`
(head weight and bias, gain, bias) and `reward_model.json` (d_model, normalisation, max lengths). An
ensemble folder holds `ensemble.json` and one such directory per member (`member-0/`, ...).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from preflab.data.tokenize import collate, encode_completion, encode_prompt, last_token_index, position_ids, truncate
from preflab.logps import shared_prompt_forward
from preflab.models import ModelError, drop_gguf_marker, is_causal_lm, load_model

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"
ENSEMBLE_FILE = "ensemble.json"
REDUCTIONS = ("mean", "min", "mean_minus_std")


class RewardModel(nn.Module):
    """`forward(input_ids, attention_mask) -> rewards [B]`; `reward(prompts, responses)`; `score(texts)`."""

    def __init__(
        self,
        backbone,
        tokenizer,
        seed: int | None = None,
        max_prompt_length: int = 0,
        max_completion_length: int = 0,
        batch_size: int = 16,
    ):
        super().__init__()
        if not is_causal_lm(backbone):
            raise ModelError(f"a reward model needs a causal-LM backbone, got {type(backbone).__name__}")
        drop_gguf_marker(backbone)
        self.backbone = backbone
        self.tokenizer = tokenizer
        d_model = backbone.config.get_text_config().hidden_size
        self.head = nn.Linear(d_model, 1)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():  # Stiennon et al. 2020: head std 1/sqrt(d_model + 1), bias 0
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=generator) / math.sqrt(d_model + 1))
            self.head.bias.zero_()
        # The Bradley-Terry loss reads only differences r_w - r_l, so the head's bias gets no gradient but rounding
        # noise, which Adam would scale up to a step of ~lr: it stays 0 (normalisation sets the offset).
        self.head.bias.requires_grad_(False)
        self.head.to(next(backbone.parameters()).dtype)
        self.register_buffer("gain", torch.tensor(1.0))
        self.register_buffer("bias", torch.tensor(0.0))
        self.max_prompt_length, self.max_completion_length = max_prompt_length, max_completion_length
        self.batch_size = batch_size
        self.normalisation: dict = {}

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalise: bool = True, prompt_length: int = 0
    ) -> torch.Tensor:
        """Rewards [B] read at each row's last real token. Given the `collate` layout's `prompt_length` P, rows
        with the same prompt (a pair's chosen and rejected) run it once (`preflab.logps.shared_prompt_forward`)."""
        decoder, T = self.backbone.get_decoder(), input_ids.shape[1]
        shared = None
        if prompt_length and bool(attention_mask[:, prompt_length:].any(-1).all()):  # every response non-empty
            shared = shared_prompt_forward(decoder, input_ids, attention_mask, prompt_length, T, {}, {})
        if shared is not None:  # the responses' states [B, C, d] and their mask
            hidden, mask = shared[2].last_hidden_state, attention_mask[:, prompt_length:]
        else:
            mask = attention_mask
            hidden = decoder(
                input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False
            ).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(mask)]  # [B, d] at the last real token
        raw = self.head(last).squeeze(-1).float()  # [B]
        return raw * self.gain + self.bias if normalise else raw

    def set_normalisation(self, raw_rewards: torch.Tensor, source: str = "") -> dict:
        """Choose gain and bias so that `raw_rewards` (of reference responses) map to mean 0, std 1."""
        mean, std = raw_rewards.float().mean().item(), raw_rewards.float().std(unbiased=False).item()
        gain = 1.0 / std if std > 1e-8 else 1.0
        self.gain.fill_(gain)
        self.bias.fill_(-mean * gain)
        self.normalisation = {
            "raw_mean": mean,
            "raw_std": std,
            "gain": gain,
            "bias": -mean * gain,
            "n": int(raw_rewards.numel()),
            "source": source,
        }
        return self.normalisation

    # --- scoring: token space in, floats out -----------------------------------------------------------
    @torch.no_grad()
    def score_ids(
        self,
        prompts_ids: list[list[int]],
        completions_ids: list[list[int]],
        normalise: bool = True,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Rewards for prompt ids + completion ids, in batches sorted by length (scores do not depend on it)."""
        batch_size = batch_size or self.batch_size
        order = sorted(range(len(prompts_ids)), key=lambda i: len(prompts_ids[i]) + len(completions_ids[i]))
        out = torch.empty(len(order))
        was_training = self.training
        self.eval()
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate(
                [prompts_ids[i] for i in idx], [completions_ids[i] for i in idx], self.tokenizer.pad_token_id
            )
            rewards = self(
                batch["input_ids"].to(self.device),
                batch["attention_mask"].to(self.device),
                normalise=normalise,
                prompt_length=int(batch["prompt_length"]),
            )
            out[idx] = rewards.cpu()
        self.train(was_training)
        return out

    def encode(self, prompts: list, responses: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt ids + completion ids (EOS-terminated), truncated as in training."""
        prompts_ids, completions_ids = [], []
        for prompt, response in zip(prompts, responses, strict=True):
            p, c, _ = truncate(
                encode_prompt(self.tokenizer, prompt),
                encode_completion(self.tokenizer, response),
                self.max_prompt_length,
                self.max_completion_length,
            )
            prompts_ids.append(p)
            completions_ids.append(c)
        return prompts_ids, completions_ids

    def reward(self, prompts: list, responses: list[str]) -> torch.Tensor:
        """The one reward interface: a float per (prompt, response), normalised."""
        return self.score_ids(*self.encode(prompts, responses))

    def score(self, texts: list[str]) -> torch.Tensor:
        """Rewards of whole prompt+response strings (tokenised as one text, EOS appended)."""
        limit = self.max_prompt_length + self.max_completion_length
        ids = [
            encode_prompt(self.tokenizer, t)[-limit if limit else 0 :] + [self.tokenizer.eos_token_id] for t in texts
        ]
        return self.score_ids(ids, [[] for _ in ids])

    # --- saving and loading ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        tensors = {"head.weight": self.head.weight, "head.bias": self.head.bias, "gain": self.gain, "bias": self.bias}
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(directory / HEAD_FILE))
        meta = {
            "format": "preflab-reward-model",
            "version": 1,
            "d_model": self.head.in_features,
            "max_prompt_length": self.max_prompt_length,
            "max_completion_length": self.max_completion_length,
            "normalisation": self.normalisation or {"gain": self.gain.item(), "bias": self.bias.item()},
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, path: str | Path) -> RewardModel:
        """Load a reward-model directory or a `preflab reward` run folder (its `model/`)."""
        directory = reward_dir(path)
        if (directory / ENSEMBLE_FILE).exists():
            raise ModelError(
                f"{directory} is a reward-model ensemble: load one member ({directory}/member-0) "
                "or use preflab.reward.load_reward"
            )
        from safetensors.torch import load_file

        meta = json.loads((directory / META_FILE).read_text())
        backbone, tokenizer = load_model(directory)
        model = cls(
            backbone,
            tokenizer,
            max_prompt_length=meta.get("max_prompt_length", 0),
            max_completion_length=meta.get("max_completion_length", 0),
        )
        tensors = load_file(str(directory / HEAD_FILE))
        with torch.no_grad():
            model.head.weight.copy_(tensors["head.weight"])
            model.head.bias.copy_(tensors["head.bias"])
            model.gain.copy_(tensors["gain"])
            model.bias.copy_(tensors["bias"])
        model.normalisation = meta.get("normalisation", {})
        return model.eval()


def reward_dir(path: str | Path) -> Path:
    """The directory holding a reward model or ensemble: `path` itself or a run folder's `model/`."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / META_FILE).exists() or (candidate / ENSEMBLE_FILE).exists():
            return candidate
    if not path.exists():
        raise ModelError(f"reward model {str(path)!r} not found")
    raise ModelError(
        f"{path} is not a reward model: no {META_FILE} or {ENSEMBLE_FILE} (train one with `preflab reward`)"
    )


def reduce_ensemble(rewards: torch.Tensor, method: str = "mean", lam: float = 1.0) -> torch.Tensor:
    """[K, N] member rewards -> [N]: mean, worst case min_k, or mean_k - lam * std_k (Coste et al. 2023)."""
    if method == "mean":
        return rewards.mean(0)
    if method == "min":
        return rewards.min(0).values
    if method == "mean_minus_std":
        return rewards.mean(0) - lam * rewards.std(0, unbiased=False)
    raise ValueError(f"ensemble reduction must be one of {REDUCTIONS}, got {method!r}")


class RewardEnsemble:
    """K reward models with separate backbones, each normalised to mean 0 / std 1 on the reference responses
    (Coste et al. z-normalise members before combining); `reward` reduces with `reduce_ensemble`."""

    def __init__(self, members: list[RewardModel], reduce: str = "mean", lam: float = 1.0):
        if reduce not in REDUCTIONS:
            raise ModelError(f"ensemble reduction must be one of {REDUCTIONS}, got {reduce!r}")
        self.members, self.reduce, self.lam = members, reduce, lam

    @property
    def tokenizer(self):
        return self.members[0].tokenizer

    def member_rewards(self, prompts: list, responses: list[str]) -> torch.Tensor:
        return torch.stack([m.reward(prompts, responses) for m in self.members])  # [K, N]

    def member_score_ids(self, prompts_ids, completions_ids, **kwargs) -> torch.Tensor:
        return torch.stack([m.score_ids(prompts_ids, completions_ids, **kwargs) for m in self.members])

    def reward(self, prompts: list, responses: list[str]) -> torch.Tensor:
        return reduce_ensemble(self.member_rewards(prompts, responses), self.reduce, self.lam)

    __call__ = reward

    def score(self, texts: list[str]) -> torch.Tensor:
        return reduce_ensemble(torch.stack([m.score(texts) for m in self.members]), self.reduce, self.lam)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        names = [f"member-{k}" for k in range(len(self.members))]
        for name, member in zip(names, self.members):
            member.save(directory / name)
        return write_ensemble_index(directory, names, self.reduce, self.lam)

    @classmethod
    def load(cls, path: str | Path, reduce: str | None = None, lam: float | None = None) -> RewardEnsemble:
        directory = reward_dir(path)
        meta = json.loads((directory / ENSEMBLE_FILE).read_text())
        members = [RewardModel.load(directory / name) for name in meta["members"]]
        return cls(members, reduce or meta.get("reduce", "mean"), meta.get("lam", 1.0) if lam is None else lam)


def write_ensemble_index(directory: str | Path, members: list[str], reduce: str = "mean", lam: float = 1.0) -> Path:
    """`ensemble.json` naming the member folders (saved one at a time while training) and the reduction."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ENSEMBLE_FILE).write_text(
        json.dumps({"members": members, "reduce": reduce, "lam": lam}, indent=2) + "\n"
    )
    return directory


def load_reward_model(path: str | Path, reduce: str | None = None) -> RewardModel | RewardEnsemble:
    """A single reward model or an ensemble, whichever the folder holds."""
    directory = reward_dir(path)
    if (directory / ENSEMBLE_FILE).exists():
        return RewardEnsemble.load(directory, reduce=reduce)
    return RewardModel.load(directory)
