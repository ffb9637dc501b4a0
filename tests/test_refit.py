"""Least-squares refit of the kept o_proj/down_proj weights (pgprune.core.refit), on tiny random models (CPU)."""
import warnings

import pytest
import torch
from conftest import make_tiny_model

from pgprune.core.adapters import get_adapter
from pgprune.core.masks import Masks
from pgprune.core.refit import apply_refit, refit_logits, refit_model, refit_weights
from pgprune.errors import PgpruneError
from pgprune.hf.slicing import slice_model
from pgprune.scorers.flap import as_extra_bias, flap_compensation_biases, flap_scores


def random_masks(layout, seed, p=0.5, drop=None):
    g = torch.Generator().manual_seed(seed)
    m = Masks.full(layout)
    for i in range(layout.num_layers):
        m.heads[i] = torch.rand(layout.kv_heads[i], generator=g) < p
        m.heads[i][torch.randint(0, layout.kv_heads[i], (1,), generator=g)] = True
        if bool(m.heads[i].all()):  # remove something in every layer
            m.heads[i][torch.randint(0, layout.kv_heads[i], (1,), generator=g)] = False
        m.channels[i] = torch.rand(layout.intermediate[i], generator=g) < p
        m.channels[i][0] = True
    if drop is not None:
        m.layers[drop] = False
    return m


def blocks(n, t, seed):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


# --- a plain reference: the layers written out, one least-squares solve per module -----------------------------------
def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _attention_heads(model, i, h):
    """Every query head's attention output [B, T, heads*hd] of layer i on hidden states h (dense, causal)."""
    cfg, at = model.config, model.model.layers[i].self_attn
    b, t, _ = h.shape
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    x = model.model.layers[i].input_layernorm(h)
    q = at.q_proj(x).view(b, t, -1, hd).transpose(1, 2)
    k = at.k_proj(x).view(b, t, -1, hd).transpose(1, 2)
    v = at.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
    cos, sin = model.model.rotary_emb(h, torch.arange(t)[None, :])
    cos, sin = cos[:, None], sin[:, None]
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = (q @ k.transpose(-1, -2)) * hd ** -0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)


def _kept_cols(model, masks, i):
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    n_cols = cfg.num_attention_heads * hd
    o = torch.tensor([c for c in range(n_cols) if masks.heads[i][c // (g * hd)]])
    return o, torch.nonzero(masks.channels[i]).flatten()


def lstsq_refit(x, cols, lin, damp):
    """Damped least squares in its plainest (target) form: min ||Y - W' X_K - b'||^2 + lam N ||W' - W_K||^2,
    Y = W X + b the dense module, via the normal equations and torch.linalg.solve (float64)."""
    x = x.reshape(-1, x.shape[-1]).double()
    w = lin.weight.double()
    b = lin.bias.double() if lin.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    y = x @ w.t() + b
    z = torch.cat([x[:, cols], torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    n, k = z.shape[0], cols.numel()
    hmat = z.t() @ z / n
    lam = damp * torch.diagonal(hmat)[:k].mean()
    r = torch.diag(torch.cat([torch.full((k,), float(lam)), torch.zeros(1)])).double()
    prior = torch.cat([w[:, cols], torch.zeros(w.shape[0], 1, dtype=torch.float64)], 1)  # [W_K, 0]
    a = torch.linalg.solve(hmat + r, (z.t() @ y / n + r @ prior.t())).t()  # [out, k+1]
    return a[:, :k].float(), a[:, k].float()


def walk(model, masks, ids, weights):
    """Run the masked model layer by layer; ``weights(i, name, x_full, kept_cols, lin)`` gives each module's
    (W', b') from its full input on the pruned model's own activations. Returns the final hidden states."""
    h = model.model.embed_tokens(ids)
    for i, layer in enumerate(model.model.layers):
        if not masks.layers[i]:
            continue
        o_cols, ch = _kept_cols(model, masks, i)
        x = _attention_heads(model, i, h)
        w, b = weights(i, "o_proj", x, o_cols, layer.self_attn.o_proj)
        h = h + x[..., o_cols] @ w.t() + b
        xm = layer.post_attention_layernorm(h)
        hm = layer.mlp.act_fn(layer.mlp.gate_proj(xm)) * layer.mlp.up_proj(xm)
        w, b = weights(i, "down_proj", hm, ch, layer.mlp.down_proj)
        h = h + hm[..., ch] @ w.t() + b
    return h


def _bias_only(x, cols, lin):
    """FLAP's bias compensation on these inputs: W_K unchanged, b + W_S mean(X_S)."""
    x = x.reshape(-1, x.shape[-1]).double()
    removed = torch.ones(x.shape[1], dtype=torch.bool)
    removed[cols] = False
    w = lin.weight.double()
    b = lin.bias.double() if lin.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return lin.weight[:, cols], (b + w[:, removed] @ x[:, removed].mean(0)).float()


def _err(x, cols, lin, w, b):
    x = x.reshape(-1, x.shape[-1]).double()
    y = x @ lin.weight.double().t() + (lin.bias.double() if lin.bias is not None else 0)
    return float(((y - x[:, cols] @ w.double().t() - b.double()) ** 2).sum())


# --- 1. exact recovery where the removed channels duplicate kept ones ---------------------------------------------
@torch.no_grad()
def test_duplicated_channels_are_folded_exactly_while_bias_only_is_not():
    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=2, ffn=48)
    layout = get_adapter(model).layout()
    for layer in model.model.layers:  # channel 24+j is an exact copy of channel j (same gate and up rows)
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
            lin.weight[24:] = lin.weight[:24]
    masks = Masks.full(layout)
    for i in range(layout.num_layers):
        masks.channels[i][24:] = False
    calib, held = blocks(8, 16, 0), blocks(4, 16, 1)
    refit = refit_weights(model, masks, calib, damp=0.0, progress=False)
    for i in range(layout.num_layers):  # the fold: W'_j = W_j + W_{24+j}, b' = 0
        d = model.model.layers[i].mlp.down_proj.weight
        torch.testing.assert_close(refit[i]["down_proj"][0], d[:, :24] + d[:, 24:], atol=1e-5, rtol=1e-5)
        assert float(refit[i]["down_proj"][1].abs().max()) < 1e-5
    dense = model(input_ids=held).logits
    torch.testing.assert_close(refit_logits(model, masks, refit, held), dense, atol=1e-5, rtol=1e-5)
    new, extra = apply_refit(model, masks, refit)
    torch.testing.assert_close(slice_model(new, masks, extra)(input_ids=held).logits, dense, atol=1e-5, rtol=1e-5)
    flap = flap_scores(model, calib, bias_compensation=True, progress=False)
    bias_only = slice_model(model, masks, as_extra_bias(flap_compensation_biases(model, masks, flap)))
    assert float((bias_only(input_ids=held).logits - dense).abs().max()) > 1e-2


# --- 2. never worse than bias-only compensation on the calibration data ---------------------------------------------
@pytest.mark.parametrize("damp", [0.0, 0.01, 1.0])
@torch.no_grad()
def test_refit_error_never_exceeds_bias_only(damp):
    model = make_tiny_model("qwen2", n_heads=4, n_kv=2, layers=3)
    masks = random_masks(get_adapter(model).layout(), seed=5)
    calib = blocks(6, 16, 2)
    refit = refit_weights(model, masks, calib, damp=damp, progress=False)
    seen = []

    def check(i, name, x, cols, lin):
        w, b = refit[i][name]
        e_refit, e_bias = _err(x, cols, lin, w, b), _err(x, cols, lin, *_bias_only(x, cols, lin))
        seen.append((i, name, e_refit, e_bias))
        assert e_refit <= e_bias * (1 + 1e-6) + 1e-9, (i, name, e_refit, e_bias)
        return w, b

    walk(model, masks, calib, check)
    assert len(seen) == 6
    assert all(e_r < 0.99 * e_b for _, _, e_r, e_b in seen)  # something removed everywhere: strictly better


# --- 3. the sequential refit equals the plain reference -------------------------------------------------------------
@pytest.mark.parametrize("arch,kv,damp,drop", [("llama", 2, 0.0, None), ("llama", 2, 0.01, None),
                                               ("qwen2", 2, 0.01, 1), ("llama", 4, 0.1, None)])
@torch.no_grad()
def test_sequential_refit_equals_reference(arch, kv, damp, drop):
    model = make_tiny_model(arch, n_heads=4, n_kv=kv, layers=3)
    masks = random_masks(get_adapter(model).layout(), seed=11, drop=drop)
    calib = blocks(6, 16, 3)
    got = refit_weights(model, masks, calib, damp=damp, batch_size=4, progress=False)
    ref = {}

    def solve(i, name, x, cols, lin):
        ref.setdefault(i, {})[name] = lstsq_refit(x, cols, lin, damp)
        return ref[i][name]

    walk(model, masks, calib, solve)
    assert sorted(got) == sorted(ref) == masks.kept_layer_indices()
    for i in ref:
        for name in ("o_proj", "down_proj"):
            for a, b in zip(got[i][name], ref[i][name]):
                assert a.dtype == torch.float32
                torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


# --- 4. sliced refit model == masked refit computation; closer to the dense model than bias-only --------------------
@pytest.mark.parametrize("arch,heads,kv", [("llama", 4, 2), ("llama", 4, 4), ("mistral", 4, 2), ("qwen2", 6, 3)])
@torch.no_grad()
def test_sliced_refit_model_equals_masked_refit(arch, heads, kv):
    model = make_tiny_model(arch, n_heads=heads, n_kv=kv, hidden=48 if heads == 6 else 32, layers=3)
    masks = random_masks(get_adapter(model).layout(), seed=7, drop=1)
    calib, held = blocks(8, 24, 4), blocks(3, 17, 5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    refit = refit_weights(model, masks, calib, progress=False)
    new, extra = refit_model(model, masks, calib, progress=False)
    assert sorted(extra) == [0, 2] and set(extra[0]) == {"o_proj", "down_proj"}
    sliced = slice_model(new, masks, extra)
    torch.testing.assert_close(sliced(input_ids=held).logits, refit_logits(model, masks, refit, held),
                               atol=1e-4, rtol=1e-4)
    # no copy of the model, which stays untouched; the sliced model holds the refit kept columns themselves
    assert new is model and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    for j, i in enumerate(masks.kept_layer_indices()):
        assert torch.equal(sliced.model.layers[j].mlp.down_proj.weight, refit[i]["down_proj"][0])
        assert torch.equal(sliced.model.layers[j].self_attn.o_proj.weight, refit[i]["o_proj"][0])
    # on the calibration blocks the refit model is closer to the dense one than bias-only compensation (what the
    # refit minimises layer by layer; perplexity of a random tiny model is no robust measure of either)
    flap = flap_scores(model, calib, bias_compensation=True, progress=False)
    bias_only = slice_model(model, masks, as_extra_bias(flap_compensation_biases(model, masks, flap)))
    dense = model(input_ids=calib).logits
    mse_refit = float(((sliced(input_ids=calib).logits - dense) ** 2).mean())
    mse_bias = float(((bias_only(input_ids=calib).logits - dense) ** 2).mean())
    assert mse_refit < mse_bias


# --- 5. rank-deficient Gram matrices --------------------------------------------------------------------------------
@torch.no_grad()
def test_constant_dead_and_too_few_inputs_stay_finite_with_warnings():
    model = make_tiny_model("qwen2", n_heads=4, n_kv=2, layers=2)  # qwen2: v_proj has a bias
    layout = get_adapter(model).layout()
    hd = layout.head_dim
    layer = model.model.layers[0]
    layer.self_attn.v_proj.weight[:hd] = 0  # KV group 0: v = its bias, so its heads' outputs are constant
    layer.mlp.up_proj.weight[0] = 0  # channel 0 is dead (act(gate) * 0)
    masks = Masks.full(layout)
    masks.heads[0][1] = False  # keep only the constant group
    masks.channels[0][1::2] = False
    masks.heads[1][0] = False
    masks.channels[1][::3] = False
    calib = blocks(4, 16, 6)
    for damp in (0.0, 0.01):
        with pytest.warns(RuntimeWarning) as rec:
            refit = refit_weights(model, masks, calib, damp=damp, progress=False)
        msgs = " | ".join(str(w.message) for w in rec)
        assert "layer 0 o_proj: 16 of 16 kept inputs are constant" in msgs
        assert "layer 0 down_proj: 1 of 24 kept inputs are constant" in msgs
        if damp == 0.0:
            assert "layer 0 o_proj: the Gram matrix is (numerically) singular; raised the damping" in msgs
        for i in refit:
            for w, b in refit[i].values():
                assert bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all())
        assert bool(torch.isfinite(refit_logits(model, masks, refit, blocks(2, 9, 7))).all())
    # fewer calibration tokens than unknowns
    with pytest.warns(RuntimeWarning) as rec:
        refit = refit_weights(model, masks, blocks(1, 5, 8), progress=False)
    msgs = " | ".join(str(w.message) for w in rec)
    assert "layer 1 down_proj: 5 calibration tokens for 32 kept inputs (+1 intercept)" in msgs
    for i in refit:
        for w, b in refit[i].values():
            assert bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all())


# --- 6. determinism ------------------------------------------------------------------------------------------------
def test_refit_is_deterministic():
    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=3)
    masks = random_masks(get_adapter(model).layout(), seed=9, drop=2)
    calib = blocks(5, 12, 9)
    a = refit_weights(model, masks, calib, batch_size=2, progress=False)
    b = refit_weights(model, masks, calib, batch_size=2, progress=False)
    assert sorted(a) == sorted(b) == [0, 1]
    for i in a:
        for name in a[i]:
            for x, y in zip(a[i][name], b[i][name]):
                assert torch.equal(x, y)


# --- bad input -----------------------------------------------------------------------------------------------------
def test_nonfinite_activation_names_layer_and_module():
    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 0] = float("inf")
    masks = random_masks(get_adapter(model).layout(), seed=1)
    with pytest.raises(PgpruneError, match="layer 1 down_proj: the calibration activations .* hold NaN/inf"):
        refit_weights(model, masks, blocks(4, 16, 0), progress=False)


def test_bad_arguments():
    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=2)
    layout = get_adapter(model).layout()
    masks = random_masks(layout, seed=1)
    with pytest.raises(PgpruneError, match="damp=-1"):
        refit_weights(model, masks, blocks(2, 8, 0), damp=-1, progress=False)
    with pytest.raises(PgpruneError, match=r"token-id tensor \[n_blocks >= 1, T >= 1\]; got \(8,\)"):
        refit_weights(model, masks, torch.zeros(8, dtype=torch.long), progress=False)
    refit = refit_weights(model, masks, blocks(4, 16, 0), progress=False)
    other = random_masks(layout, seed=2)
    with pytest.raises(PgpruneError, match="do not fit the masks"):
        apply_refit(model, other, refit)


def test_nothing_removed_gives_the_dense_model():
    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=2)
    masks = Masks.full(get_adapter(model).layout())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refit = refit_weights(model, masks, blocks(1, 4, 0), progress=False)  # no solve: no warning
    p = model.model.layers[1].self_attn.o_proj
    assert torch.equal(refit[1]["o_proj"][0], p.weight) and not bool(refit[1]["o_proj"][1].any())
    ids = blocks(2, 7, 1)
    with torch.no_grad():
        torch.testing.assert_close(refit_logits(model, masks, refit, ids), model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_progress_bar_over_layers(capsys):
    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=2)
    refit_weights(model, random_masks(get_adapter(model).layout(), seed=1), blocks(4, 16, 0), progress=True)
    assert "refit" in capsys.readouterr().err


def test_gram_refit_is_the_sequential_refit_where_the_inputs_are_dense():
    """GramRefit (the search's refit loss) solves from the dense model's Gram matrices: for a mask that removes
    only the last layer's MLP channels, the inputs are the dense ones, so it equals refit_weights there, and the
    masked forward with it equals the sliced refit model."""
    from pgprune.core.masked_forward import MaskedModel
    from pgprune.core.refit import GramRefit, kept_columns

    model = make_tiny_model("llama")
    lay = get_adapter(model).layout()
    masks, last = Masks.full(lay), lay.num_layers - 1
    g = torch.Generator().manual_seed(1)
    masks.channels[last] = torch.rand(len(masks.channels[last]), generator=g) < 0.5
    calib = blocks(12, 16, 3)
    gram = GramRefit(model, calib, damp=0.01, batch_size=4)
    ref = refit_weights(model, masks, calib, damp=0.01, batch_size=4, progress=False)
    w, b = gram.weights(last, "down_proj", kept_columns(lay, masks, last)["down_proj"])
    assert torch.allclose(w, ref[last]["down_proj"][0], atol=1e-6) and torch.allclose(b, ref[last]["down_proj"][1],
                                                                                      atol=1e-6)
    mm = MaskedModel(model)
    mm.set_refit(gram)
    ids = blocks(2, 10, 4)
    with torch.no_grad():
        src, extra = apply_refit(model, masks, ref)
        expected = slice_model(src, masks, extra)(input_ids=ids).logits
        assert (mm.logits(ids, masks) - expected).abs().max() < 1e-4
    # a mask that removes nothing is the dense model; the digest identifies the statistics
    with torch.no_grad():
        assert torch.allclose(mm.logits(ids, Masks.full(lay)), model(input_ids=ids).logits, atol=1e-4)
    assert gram.digest() == GramRefit(model, calib, damp=0.01, batch_size=4).digest()
    assert gram.digest() != GramRefit(model, blocks(12, 16, 5), damp=0.01, batch_size=4).digest()


def test_gram_refit_on_a_reference_is_the_sequential_refit_of_that_reference():
    """GramRefit(reference=masks) takes its sums on the reference's pruned, refit calibration stream: the refit of
    the reference itself is exactly refit_weights' (every layer, both modules), and the masked forward with it equals
    the sliced refit model."""
    from pgprune.core.masked_forward import MaskedModel
    from pgprune.core.refit import GramRefit, kept_columns

    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=3, ffn=40)
    lay = get_adapter(model).layout()
    masks = random_masks(lay, 3)
    calib = blocks(12, 16, 3)
    gram = GramRefit(model, calib, damp=0.01, batch_size=4, reference=masks)
    ref = refit_weights(model, masks, calib, damp=0.01, batch_size=4, progress=False)
    for i in range(lay.num_layers):
        cols = kept_columns(lay, masks, i)
        for name in ("o_proj", "down_proj"):
            w, b = gram.weights(i, name, cols[name])
            torch.testing.assert_close(w, ref[i][name][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(b, ref[i][name][1], atol=1e-5, rtol=1e-5)
    mm = MaskedModel(model)
    mm.set_refit(gram)
    ids = blocks(2, 10, 4)
    with torch.no_grad():
        src, extra = apply_refit(model, masks, ref)
        assert (mm.logits(ids, masks) - slice_model(src, masks, extra)(input_ids=ids).logits).abs().max() < 1e-4
    assert gram.digest() != GramRefit(model, calib, damp=0.01, batch_size=4).digest()


def test_refit_loss_needs_one_mask_per_forward():
    from pgprune.core.masked_forward import MaskedModel
    from pgprune.core.refit import GramRefit

    model = make_tiny_model("llama")
    lay = get_adapter(model).layout()
    mm = MaskedModel(model)
    mm.set_refit(GramRefit(model, blocks(6, 8, 0), batch_size=3))
    two = [random_masks(lay, 1), random_masks(lay, 2)]
    with pytest.raises(PgpruneError, match="separate"):
        mm.sample_losses(blocks(2, 8, 1), two, mode="batched")
    assert len(mm.sample_losses(blocks(2, 8, 1), two, mode="separate")) == 2
