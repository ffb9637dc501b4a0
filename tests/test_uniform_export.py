"""The uniform layout at real head counts: every kept count is a stock class that loads without remote code, and
the uniform allocation reaches the requested sparsity.

* LlamaConfig refuses hidden_size % num_attention_heads != 0 even with an explicit head_dim, so a Llama layer that
  keeps 24 of 32 heads (LLaMA-2-7B at 25%) or 6 of 8 KV groups (Llama-3-8B) is saved as SeedOssForCausalLM
  (transformers' Llama layer with separate bias flags and no such check); counts Llama accepts stay Llama.
* Mistral/Qwen2 keep their own class without compensation (their configs have no check); a compensated one is a
  Llama layer (LlamaForCausalLM or SeedOssForCausalLM).
* ``uniform_widths``: whole KV groups per layer, the MLP channels take the remainder (SmolLM2-135M: 3 KV groups,
  at 50% the old rule kept 2 of 3 and 50% of the channels: 45.8%).
"""
import json

import pytest
import torch
from conftest import TINY_TEXT, make_tiny_model

from pgprune.core.adapters import get_adapter
from pgprune.core.allocation import masks_from_scores, uniform_sparsity, uniform_widths
from pgprune.core.masked_forward import MaskedModel
from pgprune.core.masks import Masks, sparsity_report
from pgprune.hf.export import build_model, plan_export, save_model

# real head counts and GQA ratios, small hidden size (head_dim 8: q is 256 wide, hidden 64)
SHAPES = {"llama7b": dict(n_heads=32, n_kv=32), "llama3_8b": dict(n_heads=32, n_kv=8)}
TINY = dict(hidden=64, ffn=96, layers=2, head_dim=8)
STOCK = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def flap_scores(model):
    from pgprune.scorers import compute_scores

    calib = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(0))
    return compute_scores("flap", model, calib, bias_compensation=True, progress=False)


@pytest.mark.parametrize("compensate", [False, True], ids=["plain", "compensated"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_uniform_export_at_real_head_counts_loads_stock(arch, shape, sparsity, compensate, tmp_path,
                                                        tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from pgprune.pruning.run import compensation_biases

    model = make_tiny_model(arch, **SHAPES[shape], **TINY)
    mm = MaskedModel(model)
    lay = mm.layout
    flap = flap_scores(model)
    masks = masks_from_scores(lay, flap, sparsity, layout_kind="uniform")
    kv = int(masks.heads[0].sum())
    heads = kv * lay.group_size
    assert heads == {0.25: 24, 0.5: 16}[sparsity]  # 24 heads: 64 % 24 != 0, LlamaConfig refuses it
    extra = None
    if compensate:
        extra = compensation_biases(model, masks, flap)
        mm.set_compensation(flap["bias"])
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(1))
    expected = mm.logits(ids, masks)

    llama_layer = "LlamaForCausalLM" if 64 % heads == 0 else "SeedOssForCausalLM"
    want = llama_layer if compensate or arch == "llama" else STOCK[arch]
    pruned = build_model(model, masks, extra, layout="uniform")
    assert type(pruned).__name__ == want
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)

    res = save_model(model, masks, tmp_path / "m", tiny_tokenizer, extra_bias=extra, layout="uniform",
                     pruned=pruned)
    assert res.plan.layout == "uniform" and not res.plan.trust_remote_code and res.plan.architecture == want
    assert res.plan.converted_from == (None if want == STOCK[arch] else arch)
    cfg = json.loads((res.path / "config.json").read_text())
    assert "auto_map" not in cfg and not (res.path / "modeling_pgprune.py").exists()
    assert cfg["architectures"] == [want]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (heads, kv, 8)
    assert cfg["hidden_size"] == 64 and cfg["intermediate_size"] == int(masks.channels[0].sum())
    if want == "SeedOssForCausalLM":
        assert cfg["residual_dropout"] == 0.0 and cfg["attention_dropout"] == 0.0
        assert cfg["attention_out_bias"] == compensate and cfg["mlp_bias"] == compensate
        assert cfg["attention_bias"] == (arch == "qwen2")  # q/k/v biases only where the source has them
        assert "SeedOssForCausalLM" in (res.path / "README.md").read_text()

    reloaded = AutoModelForCausalLM.from_pretrained(res.path, trust_remote_code=False).eval()
    assert type(reloaded).__name__ == want
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
        torch.testing.assert_close(got, pruned(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) == res.params_after


def test_llama_counts_that_llama_accepts_stay_llama():
    model = make_tiny_model("llama", **SHAPES["llama3_8b"], **TINY)
    lay = MaskedModel(model).layout
    scores = {"heads": torch.rand(lay.n_units["heads"]), "channels": torch.rand(lay.n_units["channels"])}
    for sparsity, want in ((0.5, "LlamaForCausalLM"), (0.75, "LlamaForCausalLM"), (0.25, "SeedOssForCausalLM")):
        masks = masks_from_scores(lay, scores, sparsity, layout_kind="uniform")
        plan = plan_export(model, masks, layout="auto")
        assert plan.layout == "uniform" and plan.architecture == want
        assert ("hidden_size 64 with 24 attention heads" in plan.note) == (want != "LlamaForCausalLM")


def test_cli_uniform_export_of_indivisible_heads(tmp_path, tiny_tokenizer, capsys):
    """The issue's command: hidden 64, 8 heads / 4 KV heads, flap at 30% keeps 3 KV groups = 6 heads."""
    from transformers import AutoModelForCausalLM

    from pgprune import cli

    base = make_tiny_model("llama", n_heads=8, n_kv=4, hidden=64, ffn=128, layers=4)
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "calib.txt").write_text(TINY_TEXT * 5)
    out = tmp_path / "out"
    argv = ["prune", "--model", tmp_path / "base", "--sparsity", 0.3, "--method", "flap", "--calibration",
            tmp_path / "calib.txt", "--layout", "uniform", "--out", out, "--json"]
    assert cli.main([str(a) for a in argv]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["layout"] == "uniform" and s["architecture"] == "SeedOssForCausalLM" and not s["trust_remote_code"]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["pgprune_converted_from"]) == (6, "llama")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False).eval()
    assert type(model).__name__ == "SeedOssForCausalLM"
    # the decoder-layer linear sparsity is 30% within half a channel (the MLP takes what the KV groups miss)
    lay = get_adapter(base).layout()
    masks = Masks.from_json(json.loads((out / "masks.json").read_text()))
    assert abs(sparsity_report(lay, masks)["prunable_sparsity"] - 0.3) <= 0.5 * lay.channel_unit_params() / \
        lay.layer_params(4, 128) + 1e-9


# --- the uniform allocation reaches the requested sparsity -----------------------------------------------------
def smollm2_layout(layers: int = 30):
    """SmolLM2-135M's shapes (hidden 576, 9 heads, 3 KV heads, intermediate 1536), built on the meta device."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return get_adapter(model).layout()


def test_uniform_allocation_reaches_the_sparsity_on_smollm2_shapes():
    lay = smollm2_layout()
    assert (lay.kv_heads[0], lay.group_size, lay.head_dim, lay.intermediate[0]) == (3, 3, 64, 1536)
    g = torch.Generator().manual_seed(0)
    scores = {"heads": torch.rand(lay.n_units["heads"], generator=g),
              "channels": torch.rand(lay.n_units["channels"], generator=g)}
    masks = masks_from_scores(lay, scores, 0.5, layout_kind="uniform")
    counts = masks.kept_counts()
    # 2 of 3 KV groups (whole groups), the channels take the remainder: 683 of 1536, not 768
    assert set(counts["heads"]) == {2} and set(counts["channels"]) == {683}
    reached = sparsity_report(lay, masks)["prunable_sparsity"]
    assert abs(reached - 0.5) < 0.01 and reached == pytest.approx(uniform_sparsity(lay, uniform_widths(lay, 0.5)))
    # the old rule (half the channels) removed 45.8%
    assert uniform_sparsity(lay, {"heads": 2, "channels": 768}) == pytest.approx(0.4583, abs=1e-4)
    for sparsity in (0.1, 0.2, 0.3, 0.5, 0.7, 0.8):
        for group in (1, 8, 64):
            w = uniform_widths(lay, sparsity, round_to=group)
            assert w["channels"] % group == 0
            half_group = 0.5 * group * lay.channel_unit_params() / lay.layer_params(3, 1536)
            assert abs(uniform_sparsity(lay, w) - sparsity) <= half_group + 1e-9, (sparsity, group, w)
            if group <= 8:
                assert abs(uniform_sparsity(lay, w) - sparsity) < 0.01


def test_uniform_widths_shift_to_the_channels_in_both_directions():
    lay = smollm2_layout(layers=2)
    # 20%: keep_count(3, 0.8) = 2 KV groups (67%): the channels keep more than 80%
    w = uniform_widths(lay, 0.2)
    assert w["heads"] == 2 and w["channels"] > 0.8 * 1536
    # 10%: all 3 KV groups stay, the channels alone carry the 10%
    w = uniform_widths(lay, 0.1)
    assert w["heads"] == 3 and w["channels"] < 0.9 * 1536
    # a bound binds: at 95% one KV group (min_heads) is 8.3% of the layer, the channels keep the rest, >= 1 group
    w = uniform_widths(lay, 0.95, round_to=64)
    assert w == {"heads": 1, "channels": 64} and uniform_sparsity(lay, w) < 0.9


def test_prune_summary_says_when_the_uniform_layout_misses_the_sparsity(caplog):
    from pgprune.api import _uniform_sparsity_note, build_params

    lay = smollm2_layout(layers=2)
    params = build_params()
    scores = {"heads": torch.rand(lay.n_units["heads"]), "channels": torch.rand(lay.n_units["channels"])}
    near = masks_from_scores(lay, scores, 0.5, layout_kind="uniform", round_to=64)
    with caplog.at_level("INFO", logger="pgprune"):
        assert _uniform_sparsity_note(lay, near, 0.5, "uniform", "flap", params, 64) is None
    assert "every layer keeps 2 of 3 KV groups and 704 of 1536 MLP channels: 48.96%" in caplog.text
    far = masks_from_scores(lay, scores, 0.95, layout_kind="uniform", round_to=64)
    note = _uniform_sparsity_note(lay, far, 0.95, "uniform", "flap", params, 64)
    assert note.startswith("the uniform layout reached 88.5% instead of the requested 95.0%")
    assert _uniform_sparsity_note(lay, far, 0.95, "heterogeneous", "flap", params, 64) is None
