"""models.py: dropout off everywhere, the GGUF marker, the causal-LM check."""

from __future__ import annotations

import torch

from preflab.models import disable_dropout


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


def test_disable_dropout_zeroes_every_dropout_float_and_module():
    """Config floats named *dropout* or *_pdrop (GPT-2's resid_pdrop, embd_pdrop, attn_pdrop) and nn.Dropout modules."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.3,
                        embd_pdrop=0.2, attn_pdrop=0.4, summary_first_dropout=0.1,
                        bos_token_id=0, eos_token_id=1)
    model = GPT2LMHeadModel(config)
    disable_dropout(model)
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop, config.summary_first_dropout) == (0, 0, 0, 0)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.arange(1, 9).view(1, 8)
    model.train()
    assert torch.equal(_logits(model, ids), _logits(model, ids))
