"""models.py: dropout off everywhere, the GGUF marker, the causal-LM check."""

from __future__ import annotations

import pytest
import torch

from preflab.models import ModelError, disable_dropout, drop_gguf_marker, is_causal_lm, load_model


def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def test_disable_dropout_zeroes_dropout_named_in_the_config(micro_model_with_dropout):
    """Llama applies `config.attention_dropout` functionally (no nn.Dropout module): before the fix two forward
    passes in train() mode differed. After disable_dropout, train() == train() == eval() exactly."""
    model = micro_model_with_dropout
    ids = torch.arange(3, 19).view(2, 8)
    model.train()
    torch.manual_seed(1)
    assert not torch.equal(_logits(model, ids), _logits(model, ids))  # the fixture really has dropout on
    disable_dropout(model)
    model.train()
    first, second = _logits(model, ids), _logits(model, ids)
    model.eval()
    assert torch.equal(first, second)
    assert torch.equal(first, _logits(model, ids))
    assert model.config.attention_dropout == 0.0


def test_disable_dropout_reaches_a_wrapped_backbone(micro_model_with_dropout, tokenizer):
    from preflab.reward.model import RewardModel

    rm = RewardModel(micro_model_with_dropout, tokenizer, seed=0)
    disable_dropout(rm)
    assert rm.backbone.config.attention_dropout == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in rm.backbone.model.layers)


def test_disable_dropout_zeroes_every_dropout_float_and_module():
    """Config floats named *dropout* or *_pdrop (GPT-2's resid_pdrop, embd_pdrop, attn_pdrop) and nn.Dropout modules."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=50,
        n_positions=32,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.3,
        embd_pdrop=0.2,
        attn_pdrop=0.4,
        summary_first_dropout=0.1,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = GPT2LMHeadModel(config)
    disable_dropout(model)
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop, config.summary_first_dropout) == (0, 0, 0, 0)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.arange(1, 9).view(1, 8)
    model.train()
    assert torch.equal(_logits(model, ids), _logits(model, ids))


def test_is_causal_lm_for_configs_and_models(model):
    from transformers import DistilBertConfig, LlamaModel

    assert is_causal_lm(model) and is_causal_lm(model.config)
    assert not is_causal_lm(LlamaModel(model.config))  # a backbone without its LM head
    assert not is_causal_lm(DistilBertConfig())  # an encoder without a causal-LM class


def test_load_model_refuses_a_directory_that_is_not_a_causal_lm(tmp_path):
    from transformers import DistilBertConfig

    DistilBertConfig().save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a causal LM"):
        load_model(str(tmp_path))


def test_drop_gguf_marker_only_drops_a_gguf_quantizer_over_float_weights(model):
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    class OtherQuantizer:
        pass

    model.hf_quantizer, model.config.quantization_config = OtherQuantizer(), GgufConfig()
    drop_gguf_marker(model)
    assert isinstance(model.hf_quantizer, OtherQuantizer) and model.config.quantization_config is not None
    model.hf_quantizer = GgufHfQuantizer(GgufConfig())
    drop_gguf_marker(model)
    assert model.hf_quantizer is None and getattr(model.config, "quantization_config", None) is None
