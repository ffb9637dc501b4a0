"""GGUF export (llama.cpp's deci architecture): the file holds the per-layer head/KV-head/FFN arrays, every tensor of
the pruned model (q/k rows in llama.cpp's RoPE order, o_proj/down_proj biases), the tokenizer and the model card's
metadata; unsupported shapes are refused with the layer named; and, where llama-cpp-python is installed (tests
marked ``llamacpp``), llama.cpp computes the same logits as transformers for every shape pgprune produces: MHA/GQA,
compensation on/off (bias, refit), both layouts (LlamaForCausalLM, SeedOssForCausalLM, pgprune's per-layer class),
dropped layers, attention-free and MLP-free layers, Qwen2 q/k/v biases, Llama-3 RoPE scaling, and
float16/bfloat16/q8_0 matrices.

pgprune's masks never keep a layer with no KV group or no channel (Masks.validate drops the layer instead); those
layers are built here by giving a model zero-width projections (:func:`_zero_width`)."""
import contextlib
import copy
import importlib.util
import json
import re

import numpy as np
import pytest
import torch
from conftest import TINY_TEXT, cli_fails, make_tiny_model
from torch import nn

import pgprune
from pgprune.core.adapters import get_adapter
from pgprune.core.masks import Masks
from pgprune.errors import PgpruneError
from pgprune.hf.export import build_model
from pgprune.hf.folder_meta import card_metadata
from pgprune.hf.gguf import _rope_rows, rope_freq_factors, save_gguf

SMALL = {"data": {"seq_len": 16, "calib_blocks": 24, "seed": 0}, "init": {"nsamples": 8, "batch_size": 4},
         "refit": {"blocks": 12, "batch_size": 4}}
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0}
N_TOKENS = 24  # > original_max_position_embeddings: llama3 scaling changes the result


def _tiny_model(arch="llama", rope=None, **kw):
    """conftest's tiny model, with ``rope`` as its config's rope_parameters (its rotary embedding rebuilt)."""
    model = make_tiny_model(arch, **kw)
    if rope is not None:
        model.config.rope_parameters = dict(rope)
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    return model


def _field(reader, key):
    f = reader.fields[key]
    vals = [f.parts[i] for i in f.data]
    return [v.tolist()[0] if len(v) == 1 else bytes(v).decode() for v in vals]


@pytest.fixture(scope="module")
def pruned(tiny_tokenizer, tmp_path_factory):
    """A flap_refit model at 40% and its saved folder (model card with a Hub base model)."""
    model = make_tiny_model("llama")
    res = pgprune.prune(model, tiny_tokenizer, sparsity=0.4, method="flap_refit", calibration=TINY_TEXT,
                        config=SMALL, progress=False)
    folder = tmp_path_factory.mktemp("pruned") / "m"
    res.save(folder, card={"base_model": "HuggingFaceTB/SmolLM2-135M"})
    return res, folder


@pytest.fixture(scope="module")
def tok_dir(tiny_tokenizer, tmp_path_factory):
    """A folder holding only the tiny tokenizer's files (no model card)."""
    d = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(d)
    return d


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
    assert _field(r, "general.file_type") == [0]
    assert info["layers"][0]["ff"] == counts["channels"][0] and info["notes"] == []
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
    # the model card's facts
    assert _field(r, "general.base_model.0.name") == ["HuggingFaceTB/SmolLM2-135M"]
    assert _field(r, "general.base_model.0.repo_url") == ["https://huggingface.co/HuggingFaceTB/SmolLM2-135M"]
    assert _field(r, "pgprune.method") == ["flap_refit"]
    assert _field(r, "pgprune.sparsity")[0] == pytest.approx(0.4)
    assert _field(r, "pgprune.version") == [pgprune.__version__]
    desc = _field(r, "general.description")[0]
    assert "flap_refit" in desc and "40%" in desc and "compensation refit" in desc and "of 6 KV groups" in desc
    assert "SmolLM2-135M" in _field(r, "general.name")[0]


def test_dtypes_and_file_types(pruned, tmp_path):
    import gguf

    res, folder = pruned
    Q = gguf.GGMLQuantizationType
    for dtype, file_type, embd in (("float16", 1, Q.F16), ("bfloat16", 32, Q.BF16), ("q8_0", 7, Q.Q8_0)):
        save_gguf(res.model, tmp_path / f"{dtype}.gguf", folder, dtype=dtype)
        r = gguf.GGUFReader(tmp_path / f"{dtype}.gguf")
        types = {t.name: t.tensor_type for t in r.tensors}
        assert _field(r, "general.file_type") == [file_type]
        assert types["token_embd.weight"] == embd and types["blk.0.attn_q.weight"] == embd  # rows of 32
        assert types["blk.0.attn_norm.weight"] == Q.F32 and types["blk.1.ffn_down.bias"] == Q.F32
        # ffn_down rows are 29 channels long: not whole q8_0 blocks, float16 like convert_hf_to_gguf.py
        assert types["blk.0.ffn_down.weight"] == (Q.F16 if dtype == "q8_0" else embd)
    with pytest.raises(PgpruneError, match="dtype='int8'; allowed: float32, float16, bfloat16, q8_0"):
        save_gguf(res.model, tmp_path / "x.gguf", folder, dtype="int8")


def test_rope_rows_maps_rotate_half_to_adjacent_pairs():
    hd = 4
    w = torch.arange(2 * hd).float()[:, None]  # two heads, rows 0..7
    # rotate-half pairs (0, 2), (1, 3) of each head become adjacent: rows 0, 2, 1, 3 | 4, 6, 5, 7
    assert _rope_rows(w, hd).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_llama3_rope_factors_are_transformers_frequencies():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = _tiny_model(rope=LLAMA3_ROPE).config
    inv_scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    hd = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    base = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    factors = rope_freq_factors(LLAMA3_ROPE, hd)
    assert torch.allclose(base / factors, inv_scaled.float(), rtol=1e-6)  # llama.cpp divides by the factors
    assert 1 < factors[0] < 8 and factors[1:].tolist() == [8.0] * (hd // 2 - 1)  # smoothed, then scaled by 8


def test_card_metadata_is_optional(pruned, tok_dir):
    _, folder = pruned
    meta = card_metadata(folder)
    assert meta["method"] == "flap_refit" and meta["sparsity"] == pytest.approx(0.4)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M" and meta["compensation"] == "refit"
    assert card_metadata(tok_dir) == {}


def test_refused_shapes_and_inputs(tok_dir, tmp_path):
    model = make_tiny_model("llama")
    first = _zero_width(model, 0, heads=True)  # layer 0 without heads, with MLP channels
    with pytest.raises(PgpruneError, match="layer 0 keeps no attention head .* allowed: a first kept layer"):
        save_gguf(first, tmp_path / "x.gguf", tok_dir)
    yarn = copy.deepcopy(model)
    yarn.config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(PgpruneError, match="RoPE scaling 'yarn'.*allowed: default, llama3"):
        save_gguf(yarn, tmp_path / "x.gguf", tok_dir)
    with pytest.raises(PgpruneError, match="tokenizer.json"):
        save_gguf(model, tmp_path / "x.gguf", tmp_path)
    assert not (tmp_path / "x.gguf").exists()


def test_cli_writes_the_file_and_rejects_a_missing_folder(pruned, tmp_path, capsys):
    from pgprune import cli

    _, folder = pruned
    assert cli.main(["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "c.gguf")]) == 0
    assert "architecture deci" in capsys.readouterr().out and (tmp_path / "c.gguf").stat().st_size > 0
    assert cli.main(["export", str(folder), "--out", str(tmp_path / "q.gguf"), "--type", "q8_0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "q8_0"
    cli_fails(capsys, ["export", tmp_path / "nope", "--out", tmp_path / "d.gguf"], "nope", "not a folder")
    cli_fails(capsys, ["export", folder, "--out", tmp_path / "d.gguf", "--type", "q4_k"], "--type", "q8_0")
    cli_fails(capsys, ["export", folder, "--out", tmp_path / "d.gguf", "--format", "onnx"], "--format", "vllm")
    cli_fails(capsys, ["export", folder, "--out", tmp_path], "is a folder")
    (tmp_path / "empty").mkdir()
    cli_fails(capsys, ["export", tmp_path / "empty", "--out", tmp_path / "d.gguf"], "config.json")
    import shutil

    shutil.copytree(folder, tmp_path / "nomasks")
    (tmp_path / "nomasks" / "masks.json").unlink()
    cli_fails(capsys, ["export", tmp_path / "nomasks", "--out", tmp_path / "d.gguf"], "masks.json")
    assert not (tmp_path / "d.gguf").exists()


# --- llama.cpp computes the same logits ------------------------------------------------------------------------
def _zero_width(model, i: int, *, heads: bool = False, channels: bool = False):
    """A copy of ``model`` whose layer ``i`` keeps no attention head and/or no MLP channel (zero-width
    projections; the o_proj/down_proj biases stay), the shapes pgprune's masks never make but a model can have."""
    m = copy.deepcopy(model)
    layer = m.model.layers[i]
    d = m.config.hidden_size

    def empty_out(lin):  # Linear(0 -> d) keeping the bias
        new = nn.Linear(0, d, bias=lin.bias is not None)
        if lin.bias is not None:
            new.bias.data.copy_(lin.bias.data)
        return new

    if heads:
        a = layer.self_attn
        a.q_proj, a.k_proj, a.v_proj = (nn.Linear(d, 0, bias=x.bias is not None) for x in (a.q_proj, a.k_proj,
                                                                                           a.v_proj))
        a.o_proj = empty_out(a.o_proj)
    if channels:
        f = layer.mlp
        f.gate_proj, f.up_proj = (nn.Linear(d, 0, bias=x.bias is not None) for x in (f.gate_proj, f.up_proj))
        f.down_proj = empty_out(f.down_proj)
    return m


def _silenced(model, i: int, *, heads: bool = False, channels: bool = False):
    """The transformers model computing what :func:`_zero_width` describes (transformers cannot run a layer
    without heads): o_proj/down_proj weights zero, so attention/MLP add exactly their bias."""
    m = copy.deepcopy(model)
    layer = m.model.layers[i]
    if heads:
        layer.self_attn.o_proj.weight.data.zero_()
    if channels:
        layer.mlp.down_proj.weight.data.zero_()
    return m


def _with_out_biases(model, seed: int = 1):
    """o_proj/down_proj biases in every layer (a compensated model), random so that folding them is visible."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            lin.bias = nn.Parameter(torch.randn(lin.out_features, generator=g) * 0.3)
    return model


def _hand_masks(model, heads, channels, layers):
    """Masks keeping the given number of KV groups / channels (the first ones) and the given layers."""
    lay = get_adapter(model).layout()
    return Masks([torch.arange(n) < k for n, k in zip(lay.kv_heads, heads)],
                 [torch.arange(n) < k for n, k in zip(lay.intermediate, channels)],
                 torch.tensor(layers, dtype=torch.bool))


def _rounded(model, dtype: str):
    """A copy whose matrices hold the values the GGUF of ``dtype`` stores (float16/bfloat16 rounding, q8_0
    quantize-dequantize of rows that are whole blocks, float16 for the others), biases and norms untouched: the
    reference for a quantized file, so the comparison measures llama.cpp's arithmetic, not the rounding."""
    import gguf

    m = copy.deepcopy(model)
    Q = gguf.GGMLQuantizationType
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.dim() != 2:
                continue
            if dtype in ("float16", "bfloat16"):
                p.copy_(p.to(getattr(torch, dtype)).float())
            elif p.shape[-1] % 32:
                p.copy_(p.half().float())
            else:
                a = p.detach().float().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0)))
    return m


def _case(name, tokenizer):
    """(model to export, the transformers model whose logits it must reproduce) of a named shape."""
    def pruned_by(method, sparsity=0.4, arch="llama", **kw):
        model = _tiny_model(arch, **kw)
        return pgprune.prune(model, tokenizer, sparsity=sparsity, method=method, calibration=TINY_TEXT,
                             config=SMALL, progress=False).model

    if name == "mha_flap_refit":  # 4 KV heads of 1 query head, refit compensation
        m = pruned_by("flap_refit", n_heads=4, n_kv=4)
    elif name == "gqa_flap":  # 2 KV groups of 2 query heads, mean compensation
        m = pruned_by("flap")
    elif name == "gqa_wanda_sp":  # no compensation: no o_proj/down_proj bias
        m = pruned_by("wanda_sp")
    elif name == "uniform_flap":  # the stock LlamaForCausalLM of the uniform layout (zero q/k/v biases)
        model = make_tiny_model("llama")
        m = pgprune.prune(model, tokenizer, sparsity=0.5, method="flap", layout="uniform", calibration=TINY_TEXT,
                          config=SMALL, progress=False).model
        assert type(m).__name__ == "LlamaForCausalLM" and m.model.layers[0].self_attn.q_proj.bias is not None
    elif name == "uniform_seed_oss":  # 6 of 8 heads with compensation: LlamaConfig refuses 32 % 6, SeedOss
        model = make_tiny_model("llama", n_heads=8, n_kv=8)
        g = torch.Generator().manual_seed(3)
        extra = {i: {"o_proj": torch.randn(32, generator=g) * 0.3, "down_proj": torch.randn(32, generator=g) * 0.3}
                 for i in range(3)}
        m = build_model(model, _hand_masks(model, [6, 6, 6], [36, 36, 36], [1, 1, 1]), extra, layout="uniform")
        assert type(m).__name__ == "SeedOssForCausalLM"
    elif name == "qwen2_flap":  # q/k/v biases of pruned heads
        m = pruned_by("flap", arch="qwen2")
    elif name == "llama3_rope":
        m = pruned_by("flap", rope=LLAMA3_ROPE)
    elif name == "dropped_layers":  # pgprune's layer drop: layer 1 of 4 is absent, compensation in the others
        model = make_tiny_model("llama", layers=4)
        g = torch.Generator().manual_seed(2)
        extra = {i: {"o_proj": torch.randn(32, generator=g) * 0.3, "down_proj": torch.randn(32, generator=g) * 0.3}
                 for i in (0, 2, 3)}
        m = build_model(model, _hand_masks(model, [2, 0, 1, 2], [30, 0, 20, 48], [1, 0, 1, 1]), extra,
                        layout="heterogeneous")
        assert m.config.num_hidden_layers == 3
    else:  # zero-width layers in a compensated 4-layer model: (layer, no heads, no channels) each
        base = _with_out_biases(make_tiny_model("llama", layers=4))
        if name == "empty_first_layer":  # tied embeddings: token_embd changes, the output must not
            base.lm_head.weight = base.model.embed_tokens.weight
            base.config.tie_word_embeddings = True
        m, ref = base, base
        for i, heads, channels in ZERO_WIDTH[name]:
            m, ref = _zero_width(m, i, heads=heads, channels=channels), _silenced(ref, i, heads=heads,
                                                                                 channels=channels)
        return m, ref
    return m, m


# shape -> [(layer, no heads, no channels)], and where the export puts the layer's constant output
ZERO_WIDTH = {"attention_free": [(3, True, False)], "mlp_free": [(1, False, True)], "empty_layer": [(2, True, True)],
              "empty_first_layer": [(0, True, True)], "empty_then_attention_free": [(1, True, True), (2, True, False)]}
NOTES = {"attention_free": "layer 3 (no head): its o_proj bias folded into layer 2's ffn_down.bias",
         "mlp_free": "layer 1 (no channel): a zero MLP of width 1",
         "empty_layer": "layer 2 (no head, no channel: left out): its constant output folded into layer 1's",
         "empty_first_layer": "layer 0 (no head, no channel: left out): its constant output folded into token_embd",
         "empty_then_attention_free": "layer 2 (no head): its o_proj bias folded into layer 0's ffn_down.bias"}


SHAPES = ["mha_flap_refit", "gqa_flap", "gqa_wanda_sp", "uniform_flap", "uniform_seed_oss", "qwen2_flap",
          "llama3_rope", "dropped_layers", *ZERO_WIDTH]


@contextlib.contextmanager
def _no_weight_repacking():
    """Load without llama.cpp's extra buffer types (its weight repacking, `llama-cli --no-repack`): on a CPU with
    AMX, llama.cpp 0.3.36's AMX q8_0 matmul segfaults on these tiny shapes (ggml-org/llama.cpp#20824, open;
    observed on 2026-12-05's 2-core Xeon with AMX, the f32/f16/bf16 files are not repacked and pass either way)."""
    from llama_cpp import llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def _llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits [T, vocab]; a float32 KV cache (its default float16 cache alone costs ~5e-4 of the logit
    range), one thread, no weight repacking."""
    from llama_cpp import GGML_TYPE_F32, Llama

    with _no_weight_repacking():
        llm = Llama(str(path), n_ctx=64, logits_all=True, n_threads=1, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                    verbose=False)
    try:
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[:len(ids)]))  # [T, vocab]
    finally:
        llm.close()


def _rel_diff(path, reference, ids) -> float:
    """max |llama.cpp - transformers| over the logits, as a fraction of the transformers logits' range."""
    got = _llama_cpp_logits(path, ids.tolist())
    with torch.no_grad():
        expected = reference(input_ids=ids[None], use_cache=False).logits[0].float()
    return float((got - expected).abs().max() / (expected.max() - expected.min()))


IDS = torch.randint(3, 300, (N_TOKENS,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.llamacpp
@needs_llama_cpp
def test_llama_cpp_computes_the_same_logits(shape, tiny_tokenizer, tok_dir, tmp_path):
    model, reference = _case(shape, tiny_tokenizer)
    info = save_gguf(model, tmp_path / "m.gguf", tok_dir, dtype="float32")
    if shape in ZERO_WIDTH:
        assert any(NOTES[shape] in n for n in info["notes"]), info["notes"]
    diff = _rel_diff(tmp_path / "m.gguf", reference, IDS)
    print(f"{shape}: max |diff| / logit range = {diff:.2e}")
    assert diff <= 1e-4  # float32 throughout (float32 KV cache): observed <= 1.2e-6


@pytest.mark.llamacpp
@needs_llama_cpp
def test_the_rewrites_and_rope_scaling_matter(tiny_tokenizer, tok_dir, tmp_path):
    """The shapes above would fail without the export's rewrites: llama.cpp's own reading of an MLP-free layer
    (skipping the layer) and transformers without the llama3 frequencies differ far beyond the tolerance."""
    model, reference = _case("mlp_free", tiny_tokenizer)
    skipped = copy.deepcopy(reference)
    del skipped.model.layers[1]  # what feed_forward_length 0 would compute
    skipped.config.num_hidden_layers = 3
    save_gguf(model, tmp_path / "m.gguf", tok_dir)
    assert _rel_diff(tmp_path / "m.gguf", skipped, IDS) > 1e-1  # measured 0.48
    scaled, _ = _case("llama3_rope", tiny_tokenizer)
    plain = copy.deepcopy(scaled)
    plain.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    plain.model.rotary_emb = type(plain.model.rotary_emb)(plain.config)
    save_gguf(scaled, tmp_path / "r.gguf", tok_dir)
    assert _rel_diff(tmp_path / "r.gguf", plain, IDS) > 1e-1  # measured 0.60


# float16 / bfloat16 / q8_0: llama.cpp's CPU matmul converts the activations to the weights' type first (float16:
# 2^-11 relative rounding, bfloat16: 2^-8, q8_0: 8-bit blocks, up to 1/254 of a block's largest value), which no
# file can change. The reference holds the file's rounded weights, so only that activation rounding is compared:
# observed (this tiny model, 3 layers, 24 tokens) 5e-4 / 7e-3 / 1e-2 of the logit range; the bounds are 2-6x that,
# while a wrong file moves them by far more (measured: one compensation bias left out 0.28, an MLP-free layer
# skipped 0.48, llama3 frequencies ignored 0.60).
TOLERANCE = {"float16": 3e-3, "bfloat16": 2e-2, "q8_0": 2e-2}


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
@pytest.mark.llamacpp
@needs_llama_cpp
def test_llama_cpp_with_rounded_matrices(dtype, tiny_tokenizer, tok_dir, tmp_path):
    model, _ = _case("gqa_flap", tiny_tokenizer)
    model = _rounded(model, dtype)  # the file's values exactly
    save_gguf(model, tmp_path / "m.gguf", tok_dir, dtype=dtype)
    diff = _rel_diff(tmp_path / "m.gguf", model, IDS)
    print(f"{dtype}: max |diff| / logit range = {diff:.2e}")
    assert diff <= TOLERANCE[dtype]


def test_save_with_format_gguf_writes_the_folder_and_the_file(pruned, tmp_path):
    res, _ = pruned
    res.save(tmp_path / "g", format="gguf", gguf_type="f32")
    assert (tmp_path / "g" / "config.json").is_file() and (tmp_path / "g" / "model.gguf").stat().st_size > 0
    for bad, match in (({"format": "onnx"}, "format='onnx'; allowed: hf, gguf"),
                       ({"format": "gguf", "gguf_type": "q4_k"}, "gguf_type='q4_k'; allowed: f32, f16, bf16, q8_0")):
        with pytest.raises(PgpruneError, match=re.escape(match)):
            res.save(tmp_path / "bad", **bad)
    assert not (tmp_path / "bad").exists()
