"""Perplexity with the paper's protocol: CE over positions 1..T-1 of each non-overlapping block."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TEXT

from pgprune.data import tokenize_blocks
from pgprune.errors import NaNLossError, PgpruneError
from pgprune.eval import perplexity, text_perplexity


@pytest.fixture(scope="module")
def model():
    from conftest import make_tiny_model

    return make_tiny_model(vocab=300)


@pytest.fixture(scope="module")
def blocks():
    torch.manual_seed(0)
    return torch.randint(0, 300, (7, 12))


def _manual(model, blocks):
    total, count = 0.0, 0
    with torch.no_grad():
        for row in blocks:
            logits = model(input_ids=row[None]).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            for i in range(1, row.numel()):
                total -= logp[i - 1, row[i]].item()
                count += 1
    return total / count, count


def test_matches_manual_computation(model, blocks):
    res = perplexity(model, blocks, batch_size=3)
    nll, count = _manual(model, blocks)
    assert res["tokens"] == count == 7 * 11
    assert res["nll"] == pytest.approx(nll, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert res["blocks"] == 7 and res["dropped_batches"] == 0


def test_single_block_equals_hf_loss(model, blocks):
    row = blocks[:1]
    with torch.no_grad():
        loss = model(input_ids=row, labels=row).loss.item()
    assert perplexity(model, row)["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_batch_size_invariant(model, blocks):
    ref = perplexity(model, blocks, batch_size=1)["nll"]
    for bs in (2, 5, 7, 64):
        assert perplexity(model, blocks, batch_size=bs)["nll"] == pytest.approx(ref, rel=1e-5)


def test_callable_model_and_float32_logsoftmax(model, blocks):
    def fn(ids):
        return model(input_ids=ids).logits.to(torch.bfloat16)

    res = perplexity(fn, blocks, batch_size=4)
    with torch.no_grad():
        lg = model(input_ids=blocks).logits.to(torch.bfloat16).float()
    ref = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), blocks[:, 1:].reshape(-1)).item()
    assert res["nll"] == pytest.approx(ref, rel=1e-5)


def test_uniform_logits_give_vocab_perplexity():
    vocab = 50
    blocks = torch.randint(0, vocab, (3, 9))
    res = perplexity(lambda ids: torch.zeros(*ids.shape, vocab), blocks)
    assert res["ppl"] == pytest.approx(vocab, rel=1e-6)


def test_nan_batches_dropped_with_warning(model, blocks):
    calls = {"n": 0}

    def fn(ids):
        calls["n"] += 1
        out = model(input_ids=ids).logits
        return out * float("nan") if calls["n"] == 2 else out

    with pytest.warns(RuntimeWarning, match="dropped 1 batch"):
        res = perplexity(fn, blocks, batch_size=3)  # batches of 3, 3, 1: the second is NaN
    assert res["dropped_batches"] == 1 and res["dropped_blocks"] == 3
    keep = torch.cat([blocks[:3], blocks[6:]])
    assert res["tokens"] == 4 * 11
    assert res["nll"] == pytest.approx(perplexity(model, keep)["nll"], rel=1e-5)


def test_all_nan_raises(blocks):
    with pytest.raises(NaNLossError, match="every batch"):
        perplexity(lambda ids: torch.full((*ids.shape, 300), float("nan")), blocks)
    assert issubclass(NaNLossError, PgpruneError)


def test_bad_inputs(model, blocks):
    with pytest.raises(PgpruneError, match="2-D"):
        perplexity(model, blocks[0])
    with pytest.raises(PgpruneError, match="T>=2"):
        perplexity(model, blocks[:, :1])
    with pytest.raises(PgpruneError, match="batch_size"):
        perplexity(model, blocks, batch_size=0)
    with pytest.raises(PgpruneError, match="integer dtype"):
        perplexity(model, blocks.float())
    with pytest.raises(PgpruneError, match="logits have shape"):
        perplexity(lambda ids: torch.zeros(ids.shape[0], 300), blocks)


def test_text_perplexity_and_train_mode_restored(model, tiny_tokenizer):
    model.train()
    res = text_perplexity(model, tiny_tokenizer, TINY_TEXT, seq_len=32, batch_size=4, progress=True)
    assert model.training
    model.eval()
    blocks = tokenize_blocks(TINY_TEXT, tiny_tokenizer, 32)
    assert res["nll"] == pytest.approx(perplexity(model, blocks)["nll"], rel=1e-6)
    assert res["seq_len"] == 32 and res["ppl"] > 1
