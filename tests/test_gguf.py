"""GGUF export (llama.cpp's deci architecture): the file holds the per-layer head/KV-head/FFN arrays, every tensor of
the pruned model (q/k rows in llama.cpp's RoPE order, o_proj/down_proj biases), the tokenizer; unsupported shapes
are refused with the layer named; and, where llama-cpp-python is installed, llama.cpp computes the same logits."""
import importlib.util

import numpy as np
import pytest
import torch
from conftest import TINY_TEXT, cli_fails, make_tiny_model

import pgprune
from pgprune.errors import PgpruneError
from pgprune.hf.gguf import _rope_rows, save_gguf

SMALL = {"data": {"seq_len": 16, "calib_blocks": 24, "seed": 0}, "init": {"nsamples": 8, "batch_size": 4},
         "refit": {"blocks": 12, "batch_size": 4}}


def _field(reader, key):
    f = reader.fields[key]
    vals = [f.parts[i] for i in f.data]
    return [v.tolist()[0] if len(v) == 1 else bytes(v).decode() for v in vals]


@pytest.fixture
def pruned(tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama")
    res = pgprune.prune(model, tiny_tokenizer, sparsity=0.4, method="flap_refit", calibration=TINY_TEXT,
                        config=SMALL, progress=False)
    res.save(tmp_path / "m")
    return res, tmp_path / "m"


def test_gguf_holds_the_pruned_model(pruned, tmp_path):
    import gguf

    res, folder = pruned
    info = save_gguf(res.model, tmp_path / "m.gguf", folder, dtype="float32")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert _field(r, "general.architecture") == ["deci"]
    counts = res.masks.kept_counts()
    g = res.model.config.num_attention_heads // res.model.config.num_key_value_heads
    assert _field(r, "deci.attention.head_count_kv") == list(counts["heads"])
    assert _field(r, "deci.attention.head_count") == [h * g for h in counts["heads"]]
    assert _field(r, "deci.feed_forward_length") == list(counts["channels"])
    assert info["layers"][0]["ff"] == counts["channels"][0]
    tensors = {t.name: np.array(t.data) for t in r.tensors}
    p = res.model.model.layers[1]
    hd = res.model.config.head_dim
    q = torch.from_numpy(tensors["blk.1.attn_q.weight"].copy())
    assert torch.equal(q, _rope_rows(p.self_attn.q_proj.weight.detach(), hd))  # permuted head by head
    assert np.array_equal(tensors["blk.1.attn_output.weight"], p.self_attn.o_proj.weight.detach().numpy())
    assert np.array_equal(tensors["blk.1.attn_output.bias"], p.self_attn.o_proj.bias.detach().numpy())
    assert np.array_equal(tensors["blk.1.ffn_down.bias"], p.mlp.down_proj.bias.detach().numpy())
    assert tensors["token_embd.weight"].shape == tuple(res.model.get_input_embeddings().weight.shape)
    assert len(_field(r, "tokenizer.ggml.tokens")) == res.model.get_input_embeddings().weight.shape[0]
    assert _field(r, "tokenizer.ggml.model") == ["gpt2"]


def test_rope_rows_maps_rotate_half_to_adjacent_pairs():
    hd = 4
    w = torch.arange(2 * hd).float()[:, None]  # two heads, rows 0..7
    # rotate-half pairs (0, 2), (1, 3) of each head become adjacent: rows 0, 2, 1, 3 | 4, 6, 5, 7
    assert _rope_rows(w, hd).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_refused_shapes_and_inputs(tiny_tokenizer, tmp_path):
    model = make_tiny_model("qwen2")  # q/k/v biases
    res = pgprune.prune(model, tiny_tokenizer, sparsity=0.4, method="flap", calibration=TINY_TEXT, config=SMALL,
                        progress=False)
    res.save(tmp_path / "q")
    assert any(h < model.config.num_key_value_heads for h in res.masks.kept_counts()["heads"])  # heads pruned
    with pytest.raises(PgpruneError, match="q_proj bias"):
        save_gguf(res.model, tmp_path / "q.gguf", tmp_path / "q")
    with pytest.raises(PgpruneError, match="allowed: float32, float16"):
        save_gguf(res.model, tmp_path / "x.gguf", tmp_path / "q", dtype="int8")
    with pytest.raises(PgpruneError, match="tokenizer.json"):
        save_gguf(res.model, tmp_path / "x.gguf", tmp_path)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "q.gguf").exists()


def test_cli_writes_the_file_and_rejects_a_missing_folder(pruned, tmp_path, capsys):
    from pgprune import cli

    _, folder = pruned
    assert cli.main(["gguf", str(folder), "--out", str(tmp_path / "c.gguf")]) == 0
    assert "architecture deci" in capsys.readouterr().out and (tmp_path / "c.gguf").stat().st_size > 0
    cli_fails(capsys, ["gguf", tmp_path / "nope", "--out", tmp_path / "d.gguf"], "nope", "not a folder")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_computes_the_same_logits(pruned, tmp_path):
    from llama_cpp import Llama

    res, folder = pruned
    save_gguf(res.model, tmp_path / "m.gguf", folder, dtype="float32")
    ids = torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(0))
    llm = Llama(str(tmp_path / "m.gguf"), n_ctx=32, logits_all=True, verbose=False)
    llm.eval(ids.tolist())
    got = torch.tensor(np.array(llm.scores[:len(ids)]))
    with torch.no_grad():
        expected = res.model(input_ids=ids[None]).logits[0]
    assert (got - expected).abs().max() < 1e-3 * max(1.0, float(expected.abs().max()))
