"""SlimGPT as a method (pgprune.pruning.slimgpt): the Incremental Pruning Ratio, the Dynamic Group Size, the greedy
structured OBS against a direct implementation written here, and the method end to end on tiny models (CPU)."""
import math

import pytest
import torch
from conftest import make_tiny_model
from test_refit import _attention_heads, blocks

from pgprune.core.adapters import get_adapter
from pgprune.core.allocation import keep_counts
from pgprune.core.refit import _Gram, refit_weights, select_and_refit
from pgprune.errors import BudgetError, PgpruneError
from pgprune.pruning.slimgpt import (SlimGPTSelector, damped_hessian, dgs_sizes, ipr_quota, obs_prune,
                                     slimgpt_masks)


# --- the per-layer ratio and the group sizes ----------------------------------------------------------------------
def test_ipr_quota_meets_the_budget_and_prunes_more_with_depth():
    sizes = [11008] * 32
    keep = round(0.8 * sum(sizes))
    q = ipr_quota(sizes, keep)
    assert sum(q) == keep
    assert all(a >= b for a, b in zip(q, q[1:]))  # kept counts never rise with depth
    first, last = 1 - q[0] / sizes[0], 1 - q[-1] / sizes[-1]
    # the paper's README run at 20% on 32 layers: r_0 = 0.0625, r_last = 0.25 (ratio 4)
    assert first == pytest.approx(0.0625, abs=0.002) and last == pytest.approx(0.25, abs=0.005)
    # r_i follows the log curve: the middle layer's fraction
    mid = 1 - q[15] / sizes[15]
    assert mid == pytest.approx(first * (1 + 3 * math.log(16) / math.log(32)), abs=0.002)


def test_ipr_quota_keeps_the_minimum_and_refuses_an_impossible_budget():
    q = ipr_quota([3] * 30, 45, minimum=1)
    assert sum(q) == 45 and min(q) >= 1 and q[0] == 3 and q[-1] == 1
    assert ipr_quota([4, 4], 8) == [4, 4] and ipr_quota([5], 2) == [2]
    with pytest.raises(BudgetError, match="cannot keep 1 of 6 units with at least 1"):
        ipr_quota([3, 3], 1, minimum=1)


def test_dgs_sizes_shrink_from_large_groups_to_the_minimum():
    s = dgs_sizes(768)
    assert sum(s) == 768 and s[0] == 384 and all(a >= b for a, b in zip(s, s[1:]))
    assert all(k >= 8 for k in s[:-1])
    assert dgs_sizes(5000)[0] == 1024 and dgs_sizes(3) == [3] and dgs_sizes(0) == []


# --- greedy structured OBS vs its definition -----------------------------------------------------------------------
def direct_greedy(w, h, groups, steps):
    """Greedy removal by the definition of the OBS error: removing S from the kept columns K with the best update
    of the rest costs min_{W'} tr(D H D^T), D = W_K - [W' on K minus S, 0 on S]; the weights after the step are that
    minimiser (written with a plain solve over the primal, not the inverse-Hessian blocks obs_prune uses)."""
    w = w.double().clone()
    alive, removed = list(range(len(groups))), []
    for k in steps:
        cols = torch.cat([groups[a] for a in alive])

        def cost(gone):
            rest = torch.cat([groups[a] for a in alive if a not in gone])
            wp = torch.linalg.solve(h[rest][:, rest], (w[:, cols] @ h[cols][:, rest]).t()).t()  # [out, |rest|]
            d = w[:, cols].clone()
            pos = {int(c): j for j, c in enumerate(cols)}
            d[:, [pos[int(c)] for c in rest]] -= wp
            return float(torch.einsum("oi,ij,oj->", d, h[cols][:, cols], d)), rest, wp

        single = sorted(alive, key=lambda a: (cost({a})[0], a))  # each group's own error
        gone = set(single[:k])
        _, rest, wp = cost(gone)
        w[:, rest] = wp
        w[:, torch.cat([groups[a] for a in gone])] = 0.0
        removed += single[:k]
        alive = [a for a in alive if a not in gone]
    return removed, w


@pytest.mark.parametrize("width,steps", [(3, [1, 1, 1]), (1, [4, 2, 1, 1])])
def test_obs_prune_matches_the_direct_greedy_obs(width, steps):
    g = torch.Generator().manual_seed(0)
    m = 12
    x = torch.randn(400, m, generator=g, dtype=torch.float64) @ torch.randn(m, m, generator=g, dtype=torch.float64)
    w = torch.randn(5, m, generator=g, dtype=torch.float64)
    z = torch.cat([x, torch.ones(400, 1, dtype=torch.float64)], 1)
    h = damped_hessian(z.t() @ z, 400, 0.01)
    groups = [torch.arange(j * width, (j + 1) * width) for j in range(m // width)]
    got, w_got = obs_prune(w, h, groups, steps)
    want, w_want = direct_greedy(w, h, groups, steps)
    assert got == want
    torch.testing.assert_close(w_got, w_want, atol=1e-9, rtol=1e-9)


def test_obs_update_is_the_least_squares_refit_without_damping():
    """With H = X X^T / N exactly (no damping) the OBS update of the kept columns is the least-squares refit of
    the layer output on them (SlimGPT's closed form)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=g, dtype=torch.float64)
    w = torch.randn(4, 8, generator=g, dtype=torch.float64)
    h = x.t() @ x / 300
    gone, w2 = obs_prune(w, h, [torch.tensor([j]) for j in range(8)], [2, 1])
    keep = [j for j in range(8) if j not in gone]
    ls = torch.linalg.lstsq(x[:, keep], x @ w.t()).solution.t()
    torch.testing.assert_close(w2[:, keep], ls, atol=1e-9, rtol=1e-9)
    assert float(w2[:, gone].abs().max()) == 0.0


# --- the method on tiny models -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,kw", [("llama", dict(n_heads=4, n_kv=4, layers=3, ffn=48)),
                                     ("qwen2", dict(n_heads=4, n_kv=2, layers=3, ffn=40))])
def test_slimgpt_masks_meet_the_budget_with_ipr_widths(arch, kw):
    model = make_tiny_model(arch, **kw)
    layout = get_adapter(model).layout()
    calib = blocks(16, 16, 0)
    masks = slimgpt_masks(model, calib, 0.5, progress=False)
    counts, kept = keep_counts(layout, 0.5), masks.kept_counts()
    assert sum(kept["heads"]) == counts["heads"] and sum(kept["channels"]) == counts["channels"]
    assert kept["heads"] == ipr_quota(list(layout.kv_heads), counts["heads"], 1)
    assert kept["channels"] == ipr_quota(list(layout.intermediate), counts["channels"], 1)
    assert kept["channels"][0] > kept["channels"][-1]  # deeper layers pruned more
    again = slimgpt_masks(model, calib, 0.5, progress=False)  # deterministic
    assert all(torch.equal(a, b) for a, b in zip(masks.channels + masks.heads, again.channels + again.heads))


@torch.no_grad()
def test_first_layer_heads_are_chosen_by_obs_on_its_dense_input():
    """Layer 0 sees the dense model's input: its KV groups must be the ones the direct greedy OBS removes from
    o_proj's input Hessian computed here; later layers see the pruned, refit earlier layers (checked by the refit
    equality below)."""
    model = make_tiny_model("llama", n_heads=4, n_kv=4, layers=2, ffn=32)
    layout = get_adapter(model).layout()
    calib = blocks(12, 16, 3)
    sel = SlimGPTSelector(layout, 0.5)
    masks, refit = select_and_refit(model, calib, sel, progress=False)
    x = _attention_heads(model, 0, model.model.embed_tokens(calib))
    g, n = _Gram.full([x])
    h = damped_hessian(g, n, 0.01)
    hd = layout.head_dim
    groups = [torch.arange(j * hd, (j + 1) * hd) for j in range(layout.kv_heads[0])]
    want, _ = direct_greedy(model.model.layers[0].self_attn.o_proj.weight, h, groups,
                            [1] * (layout.kv_heads[0] - sel.heads[0]))
    assert sorted(torch.nonzero(~masks.heads[0]).flatten().tolist()) == sorted(want)
    # the weights chosen on the way are the refit of the chosen masks (the same sequential inputs and solves)
    again = refit_weights(model, masks, calib, progress=False)
    for i in again:
        for name in again[i]:
            torch.testing.assert_close(refit[i][name][0], again[i][name][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(refit[i][name][1], again[i][name][1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_slimgpt_masks_reconstruct_better_than_random_masks_of_the_same_widths():
    """The OBS choice is worth something: on held-out blocks, the refit model of SlimGPT's masks is closer to the
    dense model's logits than the refit models of random masks with the same per-layer widths."""
    from pgprune.core.masks import Masks
    from pgprune.core.refit import refit_logits

    model = make_tiny_model("llama", n_heads=4, n_kv=4, layers=2, ffn=64)
    layout = get_adapter(model).layout()
    calib, held = blocks(24, 16, 0), blocks(8, 16, 9)
    dense = model(input_ids=held).logits

    def err(mk):
        logits = refit_logits(model, mk, refit_weights(model, mk, calib, progress=False), held)
        return float(((logits - dense) ** 2).mean())

    masks = slimgpt_masks(model, calib, 0.5, progress=False)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        rand = Masks.full(layout)
        for i in range(layout.num_layers):
            for group, m in (("heads", masks.heads[i]), ("channels", masks.channels[i])):
                r = torch.zeros_like(m)
                r[torch.randperm(m.numel(), generator=gen)[:int(m.sum())]] = True
                getattr(rand, group)[i] = r
        assert err(masks) < err(rand)


def test_slimgpt_through_method_masks_and_bad_input(tmp_path):
    from pgprune.config import Params
    from pgprune.pruning.run import method_masks, scorers_needed

    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=2, ffn=32)
    params = Params()
    assert scorers_needed("slimgpt", params) == []
    r = method_masks("slimgpt", model, blocks(8, 16, 0), {}, params, 0.3, progress=False)
    assert r.recipe.kind == "refit" and r.extra_bias is None and r.info["time_s"] > 0
    # the refit SlimGPT computed on the way is the refit of its masks: slicing uses it instead of refitting again
    again = refit_weights(model, r.masks, blocks(8, 16, 0), progress=False)
    assert sorted(r.refit) == sorted(again)
    for i in again:
        for name in again[i]:
            torch.testing.assert_close(r.refit[i][name][0], again[i][name][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(r.refit[i][name][1], again[i][name][1], atol=1e-5, rtol=1e-5)
    from pgprune.core import compensation

    def no_second_refit(*a, **k):
        raise AssertionError("refit again")

    monkey = pytest.MonkeyPatch()
    monkey.setattr("pgprune.core.refit.refit_model", no_second_refit)
    try:
        src, extra = compensation.compensated_source(model, r.masks, r.extra_bias, r.recipe, blocks(8, 16, 0),
                                                     refit=r.refit)
    finally:
        monkey.undo()
    assert extra is not None and set(extra) == set(r.refit)
    biased = method_masks("slimgpt", model, blocks(8, 16, 0), {"flap": {}}, params, 0.3, progress=False,
                          compensation="none")
    assert biased.refit is None and biased.recipe.kind == "none"
    with pytest.raises(PgpruneError, match="calibration blocks"):
        method_masks("slimgpt", model, None, {}, params, 0.3, progress=False)
    with pytest.raises(PgpruneError, match="layout='uniform' is not allowed"):
        method_masks("slimgpt", model, blocks(8, 16, 0), {}, params, 0.3, layout_kind="uniform", progress=False)


@pytest.mark.parametrize("policy,group", [("units", 1), ("widths", 1)])
def test_search_init_slimgpt_starts_the_search_at_slimgpts_masks(policy, group):
    """search.init_allocation: slimgpt: the init scores rank SlimGPT's kept units first (the metric ordering them
    within), allocated globally, so the search's step-0 hard mask is SlimGPT's own."""
    from pgprune.config import Params
    from pgprune.core.masked_forward import MaskedModel
    from pgprune.pruning.pg import build_search, hard_masks
    from pgprune.pruning.run import recipe_of, search_init
    from pgprune.scorers.compute import compute_all_scores

    model = make_tiny_model("llama", n_heads=4, n_kv=4, layers=3, ffn=48)
    layout = get_adapter(model).layout()
    calib = blocks(16, 16, 0)
    params = Params()
    scores, _ = compute_all_scores(params.init, model, calib, scorers=["flap"], progress=False)
    p = params.search.model_copy(update={"init_allocation": "slimgpt", "policy": policy, "channel_group": group,
                                         "init_free_heads": 0.5, "init_free_channels": 0.5})
    init, p_run, start = search_init(model, calib, scores, p, 0.5, "heterogeneous", recipe_of("refit", params),
                                     progress=False)
    assert p_run.init_allocation == "global"
    want = slimgpt_masks(model, calib, 0.5, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(start.heads + start.channels, want.heads + want.channels))
    search, _, bl = build_search(MaskedModel(model), init, p_run, 0.5)
    start = hard_masks(layout, search.init_probs, p_run, 0.5, blocks=bl)
    for a, b in zip(start.heads + start.channels, want.heads + want.channels):
        assert torch.equal(a, b)
    # the uniform layout starts from the metric
    same, p_u, none = search_init(model, calib, scores, p, 0.5, "uniform", recipe_of("refit", params),
                                  progress=False)
    assert same is scores["flap"] and p_u.init_allocation == "uniform" and none is None


def test_slimgpt_sums_give_the_reference_grams_without_a_second_pass():
    """The Gram sums SlimGPT's choices saw (search_init's ``sums``) are GramRefit(reference=SlimGPT's masks)'s, bit
    for bit, so the search's refit loss on SlimGPT's stream (search_refit) needs no second sequential pass; without
    sums (or without refit_reference) search_refit takes its own."""
    from pgprune.config import Params
    from pgprune.core.refit import GramRefit
    from pgprune.pruning.run import recipe_of, search_init, search_refit
    from pgprune.scorers.compute import compute_all_scores

    model = make_tiny_model("qwen2", n_heads=4, n_kv=2, layers=3, ffn=48)
    calib = blocks(16, 16, 1)
    params = Params()
    recipe = recipe_of("refit", params)
    scores, _ = compute_all_scores(params.init, model, calib, scorers=["flap"], progress=False)
    p = params.search.model_copy(update={"init_allocation": "slimgpt"})
    sums: dict = {}
    _, _, start = search_init(model, calib, scores, p, 0.5, "heterogeneous", recipe, progress=False, sums=sums)
    assert sorted(sums) == [(i, m) for i in range(3) for m in ("down_proj", "o_proj")]
    fast = search_refit(model, calib, p, recipe, start, sums, progress=False)
    slow = GramRefit(model, calib[:recipe.blocks], damp=recipe.damp, batch_size=recipe.batch_size, reference=start)
    assert fast.digest() == slow.digest() == search_refit(model, calib, p, recipe, start, None, progress=False).digest()
    dense = search_refit(model, calib, p.model_copy(update={"refit_reference": False}), recipe, start, sums,
                         progress=False)
    assert dense.digest() == GramRefit(model, calib[:recipe.blocks], damp=recipe.damp,
                                       batch_size=recipe.batch_size).digest() != fast.digest()
    assert search_refit(model, calib, p.model_copy(update={"refit_loss": False}), recipe, start, sums) is None
    with pytest.raises(PgpruneError, match="sums of 1.o_proj are missing"):
        GramRefit.from_sums(model, {k: v for k, v in sums.items() if k != (1, "o_proj")})
