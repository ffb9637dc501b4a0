"""Speed measurements: structure and positivity only (no timing assertions)."""
from __future__ import annotations

import pytest

from pgprune.errors import PgpruneError
from pgprune.eval import forward_throughput, generation_speed


@pytest.fixture(scope="module")
def model():
    from conftest import make_tiny_model

    return make_tiny_model(vocab=300)


def test_generation_speed(model, tiny_tokenizer):
    res = generation_speed(model, tiny_tokenizer, batch_size=2, prompt_len=8, new_tokens=6, repeats=2, warmup=1,
                           device="cpu")
    for key in ("tokens_per_s", "latency_s", "latency_median_s", "latency_min_s", "per_token_ms"):
        assert res[key] > 0
    assert len(res["latencies_s"]) == 2
    assert res["new_tokens"] == 6 and res["batch_size"] == 2 and res["device"] == "cpu"
    assert res["tokens_per_s"] == pytest.approx(2 * 6 / res["latency_median_s"])
    assert res["tokens_per_s_mean"] == pytest.approx(2 * 6 / res["latency_s"])


def test_generation_never_stops_early_on_eos(model):
    """EOS is suppressed until new_tokens: a model that always prefers EOS still gives the full length."""
    import torch

    eos = model.config.eos_token_id
    with torch.no_grad():
        bias = torch.zeros(model.config.vocab_size)
        bias[eos] = 1e4
        model.lm_head.bias = torch.nn.Parameter(bias)
    try:
        res = generation_speed(model, 300, prompt_len=4, new_tokens=5, repeats=1, warmup=0)
        assert res["new_tokens"] == 5 and res["tokens_per_s"] > 0
    finally:
        model.lm_head.bias = None


def test_forward_throughput(model):
    res = forward_throughput(model, batch=2, seq_len=16, repeats=2)
    assert res["tokens_per_s"] > 0 and res["latency_s"] > 0
    assert res["batch"] == 2 and res["seq_len"] == 16 and len(res["latencies_s"]) == 2


def test_bad_arguments(model, tiny_tokenizer):
    with pytest.raises(PgpruneError, match="new_tokens"):
        generation_speed(model, tiny_tokenizer, new_tokens=0)
    with pytest.raises(PgpruneError, match="max_position_embeddings = 256"):
        generation_speed(model, tiny_tokenizer, prompt_len=200, new_tokens=100)
    with pytest.raises(PgpruneError, match="repeats"):
        forward_throughput(model, 1, 8, repeats=0)
