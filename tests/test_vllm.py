"""vLLM export (DeciLMForCausalLM / nemotron-nas): the folder computes what the pruned model computes, for every shape
test_gguf.py builds (MHA/GQA, both layouts, dropped, attention-free and MLP-free layers, compensation biases, Qwen2
q/k/v biases, Llama-3 RoPE scaling).

vLLM is not installed here (no CPU build is pinned and no GPU is lent to CI), so the folder is run by
:func:`decilm_logits`, an implementation written from vLLM's ``nemotron_nas.py`` layer: every layer has
``num_attention_heads`` query heads and ``num_attention_heads // n_heads_in_group`` KV heads (query head ``h`` reads
KV head ``h // n``), no-op attention / MLP are skipped with their biases, ``intermediate_size`` is the MLP width,
biases per ``attention_bias`` / ``qkv_bias`` / ``mlp_bias``, RoPE rotate-half (neox) order."""
import json

import pytest
import torch
from conftest import cli_fails, make_tiny_model
from safetensors.torch import load_file
from test_gguf import IDS, SHAPES, ZERO_WIDTH, _case, _hand_masks

import pgprune
from pgprune.hf.export import build_model
from pgprune.hf.gguf import rope_freq_factors
from pgprune.hf.vllm import group_size_for, save_vllm


def decilm_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] of a DeciLM folder for token ids [T] (float32, no cache)."""
    cfg = json.loads((folder / "config.json").read_text())
    sd = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    heads, hd, eps = cfg["num_attention_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    rope = cfg["rope_parameters"]
    inv = 1.0 / rope["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # [hd/2]
    if rope.get("rope_type") == "llama3":
        inv = inv / rope_freq_factors(rope, hd).double()
    ang = torch.arange(len(ids), dtype=torch.float64)[:, None] * inv[None]  # [T, hd/2]
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()  # [T, hd]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope_(t):  # [T, n, hd]
        half = torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1)
        return t * cos[:, None] + half * sin[:, None]

    def lin(x, name):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    x = sd["model.embed_tokens.weight"][ids]  # [T, hidden]
    t = len(ids)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i, block in enumerate(cfg["block_configs"]):
        pre = f"model.layers.{i}."
        if not block["attention"]["no_op"]:
            n = block["attention"]["n_heads_in_group"]
            h = rms(x, sd[pre + "input_layernorm.weight"])
            q = rope_(lin(h, pre + "self_attn.q_proj").view(t, heads, hd))  # [T, H, hd]
            k = rope_(lin(h, pre + "self_attn.k_proj").view(t, heads // n, hd)).repeat_interleave(n, 1)
            v = lin(h, pre + "self_attn.v_proj").view(t, heads // n, hd).repeat_interleave(n, 1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5  # [H, T, T]
            att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            o = torch.einsum("hqk,khd->qhd", att, v).reshape(t, heads * hd)
            x = x + lin(o, pre + "self_attn.o_proj")
        if not block["ffn"]["no_op"]:
            h = rms(x, sd[pre + "post_attention_layernorm.weight"])
            x = x + lin(torch.nn.functional.silu(lin(h, pre + "mlp.gate_proj")) * lin(h, pre + "mlp.up_proj"),
                        pre + "mlp.down_proj")
    x = rms(x, sd["model.norm.weight"])
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    return x @ head.T


def test_group_size_is_the_largest_that_fits():
    assert group_size_for(9, 3, 3) == 3 and group_size_for(9, 3, 1) == 9
    assert group_size_for(9, 3, 2) == 3  # 9 / 2 is no KV-head count: 3 KV heads, one of them zero
    assert group_size_for(32, 1, 16) == 2 and group_size_for(32, 1, 24) == 1 and group_size_for(32, 4, 8) == 4
    assert group_size_for(32, 4, 3) == 8  # 4 KV heads for 3 groups: a Llama-3-8B layer keeping 3 of 8


def _vllm_case(shape, tokenizer):
    """test_gguf's shapes, and 8 heads in 4 KV groups keeping 3 / 2 / 1 groups per layer (vLLM layouts with n = 2
    plus a zero KV head, n = 4 > G with zero query slots between the groups, n = 8)."""
    if shape != "gqa_padded_slots":
        return _case(shape, tokenizer)
    model = make_tiny_model("llama", n_heads=8, n_kv=4)
    m = build_model(model, _hand_masks(model, [3, 2, 1], [40, 30, 20], [1, 1, 1]), layout="heterogeneous")
    return m, m


@pytest.mark.parametrize("shape", [*SHAPES, "gqa_padded_slots"])
def test_the_folder_computes_the_pruned_models_logits(shape, tiny_tokenizer, tmp_path):
    model, reference = _vllm_case(shape, tiny_tokenizer)
    info = save_vllm(model, tmp_path / "v", None)
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    assert len(cfg["block_configs"]) == cfg["num_hidden_layers"] == len(info["layers"])
    for b in cfg["block_configs"]:  # exact widths, never ffn_mult (vLLM rounds ffn_mult widths to 256)
        assert "ffn_mult" not in b["ffn"] and (b["ffn"]["no_op"] or b["ffn"]["intermediate_size"] >= 1)
    if shape == "gqa_padded_slots":
        assert [(x["kv_heads"], x["n_heads_in_group"]) for x in info["layers"]] == [(4, 2), (2, 4), (1, 8)]
    got = decilm_logits(tmp_path / "v", IDS)
    with torch.no_grad():
        expected = reference(input_ids=IDS[None], use_cache=False).logits[0].float()
    diff = float((got - expected).abs().max() / (expected.max() - expected.min()))
    print(f"{shape}: max |diff| / logit range = {diff:.2e}")
    assert diff <= 1e-5


def test_layers_without_heads_or_channels_become_no_ops_with_their_biases_moved(tiny_tokenizer, tmp_path):
    model, _ = _case("empty_then_attention_free", tiny_tokenizer)  # layer 1: empty, layer 2: no heads
    info = save_vllm(model, tmp_path / "v", None)
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert [b["layer"] for b in info["layers"]] == [0, 2, 3]  # layer 1 is left out
    assert cfg["block_configs"][1]["attention"] == {"no_op": True, "replace_with_linear": False,
                                                    "n_heads_in_group": None}
    assert any("layer 2 (no attention head): its o_proj bias folded into layer 0's down_proj bias" in n
               for n in info["notes"])
    model, _ = _case("mlp_free", tiny_tokenizer)
    info = save_vllm(model, tmp_path / "w", None)
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    assert cfg["block_configs"][1]["ffn"]["no_op"] and "layer 1 (no MLP channel)" in info["notes"][0]
    model, _ = _case("empty_first_layer", tiny_tokenizer)  # tied embeddings: the head is written untied
    save_vllm(model, tmp_path / "x", None)
    assert not json.loads((tmp_path / "x" / "config.json").read_text())["tie_word_embeddings"]
    assert "lm_head.weight" in load_file(str(tmp_path / "x" / "model.safetensors"))
    assert set(ZERO_WIDTH) <= set(SHAPES)


def test_the_config_loads_in_transformers_with_the_attribute_access_vllm_uses(tiny_tokenizer, tmp_path):
    from transformers import AutoConfig

    model, _ = _case("gqa_flap", tiny_tokenizer)
    save_vllm(model, tmp_path / "v", None)
    cfg = AutoConfig.from_pretrained(str(tmp_path / "v"), trust_remote_code=True)
    b = cfg.block_configs[0]
    assert b.attention.no_op is False and b.attention.n_heads_in_group >= 2 and b.ffn.intermediate_size >= 1
    assert not hasattr(b.ffn, "ffn_mult")  # vLLM then reads intermediate_size
    assert cfg.num_attention_heads == 4 and cfg.attention_bias and cfg.mlp_bias


def test_cli_export_format_vllm(tiny_tokenizer, tmp_path, capsys):
    from pgprune import cli

    model = make_tiny_model("llama")
    res = pgprune.prune(model, tiny_tokenizer, sparsity=0.4, method="flap", calibration="x " * 400, progress=False,
                        config={"data": {"seq_len": 16, "calib_blocks": 24}, "init": {"nsamples": 8, "batch_size": 4}})
    res.save(tmp_path / "m")
    assert cli.main(["export", str(tmp_path / "m"), "--format", "vllm", "--out", str(tmp_path / "v"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["architecture"] == "DeciLMForCausalLM" and (tmp_path / "v" / "tokenizer.json").is_file()
    got = decilm_logits(tmp_path / "v", IDS)
    with torch.no_grad():
        expected = res.model(input_ids=IDS[None]).logits[0]
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.max() - expected.min())
    cli_fails(capsys, ["export", str(tmp_path / "m"), "--format", "vllm", "--out", str(tmp_path / "m")],
              "is the input folder")
    (tmp_path / "f.txt").write_text("x")
    cli_fails(capsys, ["export", str(tmp_path / "m"), "--format", "vllm", "--out", str(tmp_path / "f.txt")],
              "is a file")
    cli_fails(capsys, ["export", str(tmp_path / "m"), "--format", "vllm", "--out", str(tmp_path / "y"), "--type",
                       "q8_0"], "--type is for --format gguf")
