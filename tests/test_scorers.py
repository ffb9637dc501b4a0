"""Importance scorers: shapes for every family, and each scorer checked against an independent computation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_config, make_tiny_model

from pgprune.core.adapters import get_adapter
from pgprune.core.masked_forward import MaskedModel
from pgprune.core.masks import Masks
from pgprune.errors import PgpruneError
from pgprune.scorers import (
    SCORER_GROUPS,
    SCORERS,
    RunningMoments,
    collect_activation_stats,
    compute_scores,
    flap_compensation_biases,
    flap_fluctuation,
    flap_scores,
)
from pgprune.scorers import activations as act_mod

VOCAB = 300
MODELS = {
    "llama_mha": ("llama", dict(n_heads=4, n_kv=4)),
    "llama_gqa": ("llama", dict(n_heads=4, n_kv=2)),
    "qwen2_gqa": ("qwen2", dict(n_heads=4, n_kv=2)),
    "mistral_gqa": ("mistral", dict(n_heads=4, n_kv=2)),
    "llama_hd16": ("llama", dict(n_heads=4, n_kv=2, head_dim=16)),  # head_dim != hidden / heads
}


def calib(n=5, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, t), generator=g)


def model_with_mlp_bias(seed=0):
    """Tiny LLaMA with gate/up/down biases (LlamaConfig.mlp_bias), initialised like make_tiny_model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = make_tiny_config("llama")
    cfg.mlp_bias = True
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2 if p.dim() == 2 else 0.1)
    return model.eval()


def record_inputs(model, ids, batch=1):
    """Independent capture of every o_proj / down_proj input (all tokens) and every layer's in/out hidden states."""
    ad = get_adapter(model)
    n = len(ad.layers())
    rec = {"o": [[] for _ in range(n)], "d": [[] for _ in range(n)], "hin": [[] for _ in range(n)],
           "hout": [[] for _ in range(n)]}
    hs = []
    for i in range(n):
        p = ad.parts(i)
        hs.append(p.o_proj.register_forward_pre_hook(lambda m, a, i=i: rec["o"][i].append(a[0].reshape(-1, a[0].shape[-1]))))
        hs.append(p.down_proj.register_forward_pre_hook(lambda m, a, i=i: rec["d"][i].append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch):
            model(input_ids=ids[s:s + batch])
    for h in hs:
        h.remove()
    return {k: [torch.cat(v).double() if v else None for v in vals] for k, vals in rec.items()}


# --- shapes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(MODELS))
def test_shapes_all_scorers(key):
    arch, kw = MODELS[key]
    model = make_tiny_model(arch, **kw)
    layout = get_adapter(model).layout()
    ids = calib()
    for name in SCORERS:
        out = compute_scores(name, model, ids, batch_size=2, progress=False)
        assert set(out) == set(SCORER_GROUPS[name]), name
        for grp in SCORER_GROUPS[name]:
            t = out[grp]
            assert t.dtype == torch.float32 and t.shape == (layout.n_units[grp],), (name, grp, t.shape)
            assert torch.isfinite(t).all(), (name, grp)


def test_shapes_on_pruned_model_with_uneven_widths():
    from pgprune.hf.slicing import slice_model

    model = make_tiny_model("llama", n_heads=4, n_kv=2)
    layout = get_adapter(model).layout()
    masks = Masks.full(layout)
    masks.heads[0][1] = False
    masks.channels[1][:20] = False
    masks.channels[2][5:7] = False
    small = slice_model(model, masks)
    sl = get_adapter(small).layout()
    assert sl.kv_heads == (1, 2, 2) and sl.intermediate == (48, 28, 46)
    for name in SCORERS:
        out = compute_scores(name, small, calib(), batch_size=3, progress=False)
        for grp in SCORER_GROUPS[name]:
            assert out[grp].shape == (sl.n_units[grp],) and torch.isfinite(out[grp]).all()


def test_unknown_scorer_and_option():
    model = make_tiny_model("llama")
    with pytest.raises(PgpruneError) as e:
        compute_scores("obd", model, calib())
    for n in SCORERS:
        assert n in str(e.value)
    with pytest.raises(PgpruneError, match="allowed"):
        compute_scores("magnitude", model, None, sedd=3)
    with pytest.raises(PgpruneError, match="calibration"):
        compute_scores("flap", model, None)
    with pytest.raises(PgpruneError, match="2-D"):
        compute_scores("wanda-sp", model, torch.arange(10))
    # hyphenated alias
    assert compute_scores("wanda-sp", model, calib(), progress=False)["heads"].shape == (6,)


# --- running statistics ---------------------------------------------------------------------------------------
def test_running_moments_match_torch(monkeypatch):
    monkeypatch.setattr(act_mod, "_CHUNK_ELEMS", 7 * 5)  # force several chunks per update
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 11, 7, generator=g) * 3 + 100 for _ in range(4)]
    m = RunningMoments()
    for x in xs:
        m.update(x)
    allx = torch.cat([x.reshape(-1, 7) for x in xs]).double()
    assert m.n == allx.shape[0]
    torch.testing.assert_close(m.mean, allx.mean(0))
    torch.testing.assert_close(m.var, allx.var(0, unbiased=False))
    torch.testing.assert_close(m.sqmean, (allx ** 2).mean(0))


def test_stats_independent_of_batch_size():
    model = make_tiny_model("qwen2")
    ids = calib(7)
    a = collect_activation_stats(model, ids, batch_size=1, progress=False)
    b = collect_activation_stats(model, ids, batch_size=4, progress=False)
    assert a.n_tokens == b.n_tokens == ids.numel()
    for i in range(3):
        torch.testing.assert_close(a.o_proj[i].var, b.o_proj[i].var, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a.down_proj[i].sqmean, b.down_proj[i].sqmean, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(a.block_influence(), b.block_influence(), rtol=1e-4, atol=1e-6)


# --- magnitude ------------------------------------------------------------------------------------------------
def test_magnitude_zeroed_units_score_lowest():
    model = make_tiny_model("llama", n_heads=4, n_kv=2)
    ad = get_adapter(model)
    lay = ad.layout()
    hd, g = lay.head_dim, lay.group_size
    layer, grp, ch = 1, 1, 17
    with torch.no_grad():
        p = ad.parts(layer)
        p.q_proj.weight[grp * g * hd:(grp + 1) * g * hd] = 0
        p.k_proj.weight[grp * hd:(grp + 1) * hd] = 0
        p.v_proj.weight[grp * hd:(grp + 1) * hd] = 0
        p.o_proj.weight[:, grp * g * hd:(grp + 1) * g * hd] = 0
        p.gate_proj.weight[ch] = 0
        p.up_proj.weight[ch] = 0
        p.down_proj.weight[:, ch] = 0
    s = compute_scores("magnitude", model)
    flat_head = sum(lay.kv_heads[:layer]) + grp
    flat_ch = sum(lay.intermediate[:layer]) + ch
    assert int(s["heads"].argmin()) == flat_head and float(s["heads"][flat_head]) == 0.0
    assert int(s["channels"].argmin()) == flat_ch and float(s["channels"][flat_ch]) == 0.0
    assert (s["heads"] > 0).sum() == lay.n_units["heads"] - 1
    torch.testing.assert_close(s["layers"].sum(), torch.tensor(1.0))
    # brute force for one other group: norm of the concatenated weights
    p = ad.parts(0)
    w = torch.cat([p.q_proj.weight[: g * hd].flatten(), p.k_proj.weight[:hd].flatten(),
                   p.v_proj.weight[:hd].flatten(), p.o_proj.weight[:, : g * hd].flatten()])
    torch.testing.assert_close(s["heads"][0], w.norm())


# --- wanda-sp -------------------------------------------------------------------------------------------------
def test_wanda_sp_column_scaling_is_linear():
    model = make_tiny_model("llama", n_heads=4, n_kv=2)
    ids = calib()
    base = compute_scores("wanda_sp", model, ids, progress=False)
    layer, ch = 2, 5
    off = sum(get_adapter(model).layout().intermediate[:layer])
    with torch.no_grad():
        get_adapter(model).parts(layer).down_proj.weight[:, ch] *= 10
    new = compute_scores("wanda_sp", model, ids, progress=False)
    torch.testing.assert_close(new["channels"][off + ch], base["channels"][off + ch] * 10, rtol=1e-5, atol=0)
    others = torch.ones_like(base["channels"], dtype=torch.bool)
    others[off + ch] = False
    torch.testing.assert_close(new["channels"][others], base["channels"][others])
    torch.testing.assert_close(new["heads"], base["heads"])


@pytest.mark.parametrize("key", ["llama_gqa", "llama_hd16", "qwen2_gqa"])
def test_wanda_sp_matches_brute_force(key):
    arch, kw = MODELS[key]
    model = make_tiny_model(arch, **kw)
    ad = get_adapter(model)
    lay = ad.layout()
    ids = calib(4)
    s = compute_scores("wanda_sp", model, ids, batch_size=3, progress=False)
    rec = record_inputs(model, ids)
    hd, g = lay.head_dim, lay.group_size
    heads, chans = [], []
    for i in range(lay.num_layers):
        p = ad.parts(i)
        for w, x, out in ((p.o_proj.weight, rec["o"][i], "o"), (p.down_proj.weight, rec["d"][i], "d")):
            metric = w.double().abs() * torch.sqrt((x ** 2).mean(0))[None, :]  # full [out, in] matrix
            col = metric.mean(0)
            if out == "d":
                chans.append(col)
                continue
            for k in range(lay.kv_heads[i]):
                per_q = [col[(k * g + j) * hd:(k * g + j + 1) * hd].sum() for j in range(g)]
                heads.append(torch.stack(per_q).mean())
    torch.testing.assert_close(s["heads"], torch.stack(heads).float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s["channels"], torch.cat(chans).float(), rtol=1e-5, atol=1e-7)


# --- flap -----------------------------------------------------------------------------------------------------
def test_flap_constant_channel_has_zero_fluctuation():
    model = model_with_mlp_bias()
    ad = get_adapter(model)
    layer, ch = 1, 9
    with torch.no_grad():
        p = ad.parts(layer)
        p.gate_proj.weight[ch] = 0
        p.up_proj.weight[ch] = 0  # input of down_proj channel = act(b_gate) * b_up for every token
    stats = collect_activation_stats(model, calib(), batch_size=2, progress=False)
    fl = flap_fluctuation(model, stats)
    assert int(fl["down_proj"][layer].argmin()) == ch and float(fl["down_proj"][layer][ch]) < 1e-12
    flat = sum(ad.layout().intermediate[:layer]) + ch
    assert int(fl["channels"].argmin()) == flat
    # per-layer standardisation (FLAP's default): z-scores per layer
    s = flap_scores(model, None, stats=stats)
    seg = s["channels"][sum(ad.layout().intermediate[:layer]):][:48]
    assert int(seg.argmin()) == ch
    torch.testing.assert_close(seg.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(seg.std(), torch.tensor(1.0), atol=1e-5, rtol=0)
    m = flap_scores(model, None, stats=stats, standardize="module")
    assert int(m["channels"].argmin()) == flat
    torch.testing.assert_close(m["channels"].std(), torch.tensor(1.0), atol=1e-5, rtol=0)
    with pytest.raises(PgpruneError, match="allowed"):
        flap_scores(model, None, stats=stats, standardize="global")


def test_flap_fluctuation_brute_force_and_constant_head():
    model = make_tiny_model("qwen2", n_heads=4, n_kv=2)
    ad = get_adapter(model)
    lay = ad.layout()
    hd, g = lay.head_dim, lay.group_size
    layer, grp = 2, 0
    with torch.no_grad():  # v rows zero: every query head of the group outputs softmax-average of b_v = b_v
        ad.parts(layer).v_proj.weight[grp * hd:(grp + 1) * hd] = 0
    ids = calib()
    stats = collect_activation_stats(model, ids, batch_size=2, progress=False)
    fl = flap_fluctuation(model, stats)
    rec = record_inputs(model, ids)
    for i in range(lay.num_layers):
        wo = ad.parts(i).o_proj.weight.double()
        want = rec["o"][i].var(0, unbiased=False) * (wo ** 2).sum(0)
        torch.testing.assert_close(fl["o_proj"][i], want, rtol=1e-6, atol=1e-10)
        wd = ad.parts(i).down_proj.weight.double()
        torch.testing.assert_close(fl["down_proj"][i], rec["d"][i].var(0, unbiased=False) * (wd ** 2).sum(0),
                                   rtol=1e-6, atol=1e-10)
    flat = sum(lay.kv_heads[:layer]) + grp
    assert int(fl["heads"].argmin()) == flat and float(fl["heads"][flat]) < 1e-9
    torch.testing.assert_close(fl["heads"][:2], torch.stack([fl["o_proj"][0][:g * hd].sum(),
                                                              fl["o_proj"][0][g * hd:].sum()]))


def test_flap_bias_formula_by_hand():
    model = make_tiny_model("llama", n_heads=4, n_kv=2)
    ad = get_adapter(model)
    lay = ad.layout()
    hd, g = lay.head_dim, lay.group_size
    ids = calib()
    s = compute_scores("flap", model, ids, bias_compensation=True, progress=False)
    masks = Masks.full(lay)
    masks.heads[1][0] = False
    masks.channels[0][[3, 7, 30]] = False
    masks.layers[2] = False
    b = flap_compensation_biases(model, masks, s)
    assert set(b) == {(0, "o_proj"), (0, "down_proj"), (1, "o_proj"), (1, "down_proj")}
    rec = record_inputs(model, ids)
    w = ad.parts(1).o_proj.weight.double()
    want = w[:, : g * hd] @ rec["o"][1][:, : g * hd].mean(0)
    torch.testing.assert_close(b[(1, "o_proj")], want.float(), rtol=1e-5, atol=1e-6)
    w = ad.parts(0).down_proj.weight.double()
    idx = torch.tensor([3, 7, 30])
    torch.testing.assert_close(b[(0, "down_proj")], (w[:, idx] @ rec["d"][0][:, idx].mean(0)).float(),
                               rtol=1e-5, atol=1e-6)
    assert float(b[(0, "o_proj")].abs().max()) == 0.0 and float(b[(1, "down_proj")].abs().max()) == 0.0


def _compensated(model, masks, biases):
    comp = copy.deepcopy(model)
    ad = get_adapter(comp)
    with torch.no_grad():
        for (i, name), vec in biases.items():
            lin = getattr(ad.parts(i), name)
            if lin.bias is None:
                lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features))
            lin.bias += vec
    return comp


def test_flap_compensation_exact_for_constant_inputs():
    # MLP: channel with constant input (zero gate/up rows, biases set) -> compensated pruning is exact
    model = model_with_mlp_bias(seed=3)
    ad = get_adapter(model)
    with torch.no_grad():
        for ch in (4, 11):
            ad.parts(0).gate_proj.weight[ch] = 0
            ad.parts(0).up_proj.weight[ch] = 0
    ids = calib()
    s = compute_scores("flap", model, ids, bias_compensation=True, progress=False)
    masks = Masks.full(ad.layout())
    masks.channels[0][[4, 11]] = False
    dense = MaskedModel(model).hidden_states(ids)
    pruned = MaskedModel(model).hidden_states(ids, masks)
    comp = MaskedModel(_compensated(model, masks, flap_compensation_biases(model, masks, s))).hidden_states(ids, masks)
    assert (pruned - dense).abs().max() > 1e-3  # the channel mattered
    torch.testing.assert_close(comp, dense, rtol=1e-5, atol=1e-5)

    # attention: KV group with zero v rows in qwen2 -> o_proj input of its query heads is constant b_v
    model = make_tiny_model("qwen2", n_heads=4, n_kv=2, seed=4)
    ad = get_adapter(model)
    hd = ad.layout().head_dim
    with torch.no_grad():
        ad.parts(1).v_proj.weight[hd:2 * hd] = 0
    s = compute_scores("flap", model, ids, bias_compensation=True, progress=False)
    masks = Masks.full(ad.layout())
    masks.heads[1][1] = False
    dense = MaskedModel(model).hidden_states(ids)
    pruned = MaskedModel(model).hidden_states(ids, masks)
    comp = MaskedModel(_compensated(model, masks, flap_compensation_biases(model, masks, s))).hidden_states(ids, masks)
    assert (pruned - dense).abs().max() > 1e-3
    torch.testing.assert_close(comp, dense, rtol=1e-5, atol=1e-5)


# --- taylor ---------------------------------------------------------------------------------------------------
def test_taylor_restores_model_and_is_batch_invariant():
    model = make_tiny_model("qwen2", n_heads=4, n_kv=2)
    ad = get_adapter(model)
    model.model.embed_tokens.weight.requires_grad_(False)  # a non-default flag that must come back
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    ids = calib(6)
    with torch.no_grad():  # the scorer must enable grad itself
        a = compute_scores("taylor", model, ids, batch_size=6, progress=False)
    b = compute_scores("taylor", model, ids, batch_size=2, progress=False)
    for grp in ("heads", "channels", "layers"):
        assert (a[grp] >= 0).all() and a[grp].sum() > 0
        torch.testing.assert_close(a[grp], b[grp], rtol=1e-4, atol=1e-7)
    for k, p in model.named_parameters():
        assert p.grad is None, k
        assert p.requires_grad == flags[k], k
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the layer score is the sum of its units
    lay = ad.layout()
    torch.testing.assert_close(a["layers"][0], a["heads"][:lay.kv_heads[0]].sum() +
                               a["channels"][:lay.intermediate[0]].sum(), rtol=1e-5, atol=0)


def test_taylor_brute_force_one_channel():
    model = make_tiny_model("llama", n_heads=4, n_kv=2)
    ad = get_adapter(model)
    ids = calib(3)
    s = compute_scores("taylor", model, ids, batch_size=1, progress=False)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    p = ad.parts(2)
    ch = 13
    want = ((p.gate_proj.weight[ch] * p.gate_proj.weight.grad[ch]).abs().sum()
            + (p.up_proj.weight[ch] * p.up_proj.weight.grad[ch]).abs().sum()
            + (p.down_proj.weight[:, ch] * p.down_proj.weight.grad[:, ch]).abs().sum())
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(s["channels"][2 * 48 + ch], want.detach(), rtol=1e-4, atol=1e-8)


# --- shortgpt -------------------------------------------------------------------------------------------------
def test_shortgpt_identity_layer_has_zero_influence():
    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=4)
    ad = get_adapter(model)
    with torch.no_grad():
        ad.parts(2).o_proj.weight.zero_()
        ad.parts(2).down_proj.weight.zero_()
    ids = calib()
    s = compute_scores("shortgpt", model, ids, batch_size=2, progress=False)["layers"]
    assert int(s.argmin()) == 2 and abs(float(s[2])) < 1e-6
    assert (s[[0, 1, 3]] > 1e-3).all()
    # independent: layer inputs from the functional forward
    final, inputs = MaskedModel(model).hidden_states(ids, collect=True)
    outs = inputs[1:] + [final]
    want = torch.stack([1 - F.cosine_similarity(hi.double(), ho.double(), dim=-1).mean()
                        for hi, ho in zip(inputs, outs)])
    torch.testing.assert_close(s, want.float(), rtol=1e-4, atol=1e-6)


# --- random ---------------------------------------------------------------------------------------------------
def test_random_seeded():
    model = make_tiny_model("llama")
    a = compute_scores("random", model, seed=3)
    b = compute_scores("random", model, seed=3)
    c = compute_scores("random", model, seed=4)
    for grp in ("heads", "channels", "layers"):
        assert torch.equal(a[grp], b[grp])
        assert ((a[grp] >= 0) & (a[grp] < 1)).all()
    assert not torch.equal(a["channels"], c["channels"])
