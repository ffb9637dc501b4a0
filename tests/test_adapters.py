"""Unit enumeration, parameter accounting (the paper's convention and the total) and unsupported models."""
import pytest
import torch
from conftest import make_tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

from pgprune.core.adapters import get_adapter
from pgprune.core.masks import Masks, sparsity_report
from pgprune.errors import UnsupportedArchitectureError


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_layout_counts_units_and_params(arch):
    model = make_tiny_model(arch, n_heads=4, n_kv=2, layers=3, hidden=32, ffn=48)
    layout = get_adapter(model).layout()
    assert layout.kv_heads == (2, 2, 2) and layout.intermediate == (48, 48, 48) and layout.group_size == 2
    assert layout.head_dim == 8
    assert layout.n_units == {"heads": 6, "channels": 144, "layers": 3}
    linear = sum(p.numel() for n, p in model.named_parameters() if "layers." in n and "norm" not in n)
    assert layout.prunable_params() == linear
    assert layout.total_params() == sum(p.numel() for p in model.parameters())
    # one KV group = G query heads (q rows + o cols) + its k and v rows
    d, hd, g = 32, 8, 2
    expected = 2 * g * hd * d + 2 * hd * d + (g * hd + 2 * hd if arch == "qwen2" else 0)
    assert layout.head_unit_params() == expected
    assert layout.channel_unit_params() == 3 * d


def test_sparsity_report_half_of_everything():
    model = make_tiny_model("llama", n_heads=4, n_kv=4, ffn=48)
    layout = get_adapter(model).layout()
    m = Masks.full(layout)
    for i in range(layout.num_layers):
        m.heads[i][2:] = False
        m.channels[i][24:] = False
    rep = sparsity_report(layout, m)
    assert rep["prunable_sparsity"] == pytest.approx(0.5)
    assert 0 < rep["total_sparsity"] < 0.5  # embeddings and norms are not pruned
    assert rep["per_layer"]["heads"] == [2, 2, 2]


def test_unsupported_architecture_is_named():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="model_type='gpt2'.*supported model types"):
        get_adapter(model)


def test_pretraining_tp_is_refused():
    model = make_tiny_model("llama")
    model.config.pretraining_tp = 2
    with pytest.raises(Exception, match="pretraining_tp=2"):
        get_adapter(model)


def test_head_dim_from_config_not_hardcoded():
    model = make_tiny_model("llama", n_heads=4, n_kv=2, hidden=32, head_dim=16)
    layout = get_adapter(model).layout()
    assert layout.head_dim == 16
    ids = torch.randint(0, 300, (1, 6))
    from pgprune.core.masked_forward import MaskedModel

    torch.testing.assert_close(MaskedModel(model).logits(ids), model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
