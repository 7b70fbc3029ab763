"""LoRA adapters (peft): add them, save and load them as run folders, merge them, and use the base as reference.

--lora-r R  on sft, reward, dpo, ppo, rloo, grpo: `add_lora` wraps the model in a `peft.PeftModel`; only the
            adapters train (and the reward model's head, PPO's value head), the base weights stay frozen
reference   `reference_of(policy)`: with an adapter, the same model with the adapter switched off (no second
            copy of the weights in memory); without one, a frozen copy of the starting policy
run folder  `model/` holds the adapter (`adapter_model.safetensors`, `adapter_config.json`), the tokenizer and
            `preflab_adapter.json` naming the base as preflab loads it (a folder, a .gguf or 'smollm2');
            `preflab.models.load_model` loads base + adapter from it, so a later stage takes it as `--model`
export      `preflab export RUN --merge --out DIR` folds the adapter into the base: a plain Hugging Face
            directory that `AutoModelForCausalLM` loads alone
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from preflab.config import ConfigError, RunConfig, check, opt
from preflab.stages import stage

BASE_FILE = "preflab_adapter.json"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists() and (Path(path) / BASE_FILE).exists()


def is_adapted(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def add_lora(model, config, base: str):
    """`model` with LoRA adapters (config.lora_r > 0), or `model` itself. `base` is the spec the base was loaded
    from, recorded so that the saved adapter can be loaded back onto it."""
    if not getattr(config, "lora_r", 0):
        return model
    from peft import LoraConfig, get_peft_model

    targets = config.lora_targets.strip()
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type="CAUSAL_LM",
    )
    try:
        adapted = get_peft_model(model, lora)
    except ValueError as exc:  # e.g. a target module the model does not have
        raise ConfigError(f"lora_targets {targets!r}: {exc}") from None
    adapted.preflab_base = str(Path(base).resolve()) if Path(base).exists() else str(base)
    return adapted


def save_adapter(model, tokenizer, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / BASE_FILE).write_text(json.dumps({"base": model.preflab_base}, indent=2) + "\n")
    return directory


def load_adapter(directory: str | Path, tokenizer=None, trainable: bool = False):
    """(base + adapter, tokenizer) from an adapter folder (eval mode, dropout off)."""
    from peft import PeftModel

    from preflab.models import disable_dropout, load_model, load_tokenizer

    directory = Path(directory)
    base_spec = json.loads((directory / BASE_FILE).read_text())["base"]
    tokenizer = tokenizer or load_tokenizer(directory)
    base, _ = load_model(base_spec, tokenizer=tokenizer)
    model = PeftModel.from_pretrained(base, directory, is_trainable=trainable)
    model.preflab_base = base_spec
    disable_dropout(model)
    return model.eval(), tokenizer


def load_adapter_weights(model, path: Path) -> None:
    """An adapter checkpoint's weights into an adapted model, in place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))


class AdapterDisabled(nn.Module):
    """The base model behind an adapted one: the same weights, the adapter switched off for each forward."""

    def __init__(self, adapted):
        super().__init__()
        self.adapted = [adapted]  # a list: not registered as a sub-module (its parameters are the policy's)

    @property
    def device(self) -> torch.device:
        return self.adapted[0].device

    def forward(self, *args, **kwargs):
        with self.adapted[0].disable_adapter():
            return self.adapted[0](*args, **kwargs)

    def get_base_model(self):
        """The transformers model under the adapter (as PEFT's own `get_base_model`): its forward's signature."""
        return self.adapted[0].get_base_model()


def frozen_copy(model):
    """A copy of `model`, eval mode, no gradients."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def reference_of(policy):
    """The frozen reference for a policy about to be trained: the base with the adapter off, or a frozen copy."""
    return AdapterDisabled(policy) if is_adapted(policy) else frozen_copy(policy)


def trainable_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


# ---- `preflab export` --------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ExportConfig(RunConfig):
    run: str = opt("", "the run folder (or model directory) to export", positional=True)
    merge: bool = opt(False, "fold a LoRA adapter into the base weights (a plain HF directory with no peft needed)")

    def __post_init__(self):
        super().__post_init__()
        check(bool(self.run), "give the run folder: preflab export RUN --merge --out DIR")
        check(bool(self.out), "give --out: the folder to write the exported model to")


@stage(ExportConfig)
def export(config: ExportConfig) -> dict:
    """Write a run's model as a Hugging Face directory; with --merge, the adapter folded into the base."""
    from preflab.models import load_model

    model, tokenizer = load_model(config.run)
    if is_adapted(model) and not config.merge:
        raise ConfigError(f"{config.run} holds a LoRA adapter: give --merge to fold it into the base weights")
    if is_adapted(model):
        model = model.merge_and_unload()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"[export] {out}: {type(model).__name__}, {n / 1e6:.2f}M parameters"
        + (" (adapter merged)" if config.merge else ""),
        flush=True,
    )
    return {"out": str(out), "parameters": n, "merged": bool(config.merge)}
