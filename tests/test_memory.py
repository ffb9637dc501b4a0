"""Memory plan from the config alone (sizes equal the built model's) and the measured-peak helpers."""
import pytest
import torch
from conftest import make_tiny_config, make_tiny_model

from pgprune.errors import PgpruneError
from pgprune.hf.memory import current_memory, format_plan, peak_memory, plan, reset_peak_memory, weight_sizes


@pytest.mark.parametrize("arch,kw", [("llama", dict(n_heads=4, n_kv=2)), ("qwen2", dict(n_heads=4, n_kv=2)),
                                     ("mistral", dict(n_heads=4, n_kv=4, layers=5))])
@pytest.mark.parametrize("dtype,nbytes", [("float32", 4), ("bfloat16", 2)])
def test_sizes_equal_the_built_model(arch, kw, dtype, nbytes):
    model = make_tiny_model(arch, **kw)
    sizes = weight_sizes(model.config, dtype)
    assert sizes["weights"] == sum(p.numel() for p in model.parameters()) * nbytes
    layers = [sum(p.numel() for p in layer.parameters()) * nbytes for layer in model.model.layers]
    assert sizes["layers"] == layers
    assert sizes["outside"] == sizes["weights"] - sum(layers) > 0


def test_tied_embeddings_counted_once(tmp_path):
    cfg = make_tiny_config("llama")
    cfg.tie_word_embeddings = True
    cfg.save_pretrained(tmp_path)  # a folder with config.json and no weights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg)
    d = plan(tmp_path, "float32", batch=2, seq_len=16, samples=2, device="cpu")
    assert d["weights"] == sum(p.numel() for p in model.parameters()) * 4
    assert d["params"] == sum(p.numel() for p in model.parameters())


def test_plan_orders_the_placements_and_formats():
    cfg = make_tiny_config("llama", layers=8, hidden=64, ffn=256, vocab=100)
    d = plan(cfg, "bfloat16", offload="disk", batch=4, seq_len=32, samples=4, device="cuda", gpus=2,
             gpu_memory="1MiB")
    rows = d["rows"]
    assert d["selected"] == "offload disk" and d["sample_mode"] == "batched"
    assert rows["offload disk"]["device_peak"] < rows["device_map auto (2 GPUs)"]["device_peak"] \
        < rows["offload none"]["device_peak"]
    assert rows["offload disk"]["host"] < rows["offload cpu"]["host"]
    assert rows["offload disk"]["disk"] == d["weights"]
    assert rows["offload none"]["device_peak"] >= d["weights"] + d["activations"]
    assert rows["offload none"]["fits"] is False
    text = format_plan(d)
    assert "| offload disk (selected) |" in text and "8 layers" in text
    sep = plan(cfg, "bfloat16", batch=4, seq_len=32, samples=4, device="cpu")
    assert sep["sample_mode"] == "separate" and sep["selected"] == "offload none"
    with pytest.raises(PgpruneError, match="offload='ssd' is not allowed"):
        plan(cfg, offload="ssd")
    with pytest.raises(PgpruneError, match="memory size '80 parsecs'"):
        plan(cfg, gpu_memory="80 parsecs")
    with pytest.raises(PgpruneError, match="samples must be a positive integer"):
        plan(cfg, samples=0)


def test_peak_memory_helpers_on_cpu():
    if not reset_peak_memory("cpu"):
        pytest.skip("this platform cannot reset the peak RSS")
    before = peak_memory("cpu")
    x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB touched
    assert peak_memory("cpu") >= before + 60 * 2 ** 20 - 8 * 2 ** 20
    assert current_memory("cpu") > 0
    del x
