"""Masked forward == sliced model == reloaded model, for MHA and GQA tiny configs of every family."""
import pytest
import torch
from conftest import make_tiny_model

from pgprune.core.masked_forward import MaskedModel
from pgprune.core.masks import Masks
from pgprune.errors import BudgetError
from pgprune.hf.slicing import load_pruned, save_pruned, slice_model

CASES = [("llama", 4, 4), ("llama", 4, 2), ("mistral", 4, 2), ("qwen2", 4, 2), ("qwen2", 6, 3)]


def random_masks(layout, seed, p=0.5, drop_layer=True):
    g = torch.Generator().manual_seed(seed)
    m = Masks.full(layout)
    for i in range(layout.num_layers):
        m.heads[i] = torch.rand(layout.kv_heads[i], generator=g) < p
        m.heads[i][torch.randint(0, layout.kv_heads[i], (1,), generator=g)] = True
        m.channels[i] = torch.rand(layout.intermediate[i], generator=g) < p
        m.channels[i][0] = True
    if drop_layer:
        m.layers[1] = False
    return m


@pytest.mark.parametrize("arch,heads,kv", CASES)
def test_masked_equals_sliced_equals_reloaded(arch, heads, kv, tmp_path):
    model = make_tiny_model(arch, n_heads=heads, n_kv=kv, hidden=48 if heads == 6 else 32)
    mm = MaskedModel(model)
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(1))
    masks = random_masks(mm.layout, seed=3)
    gathered = mm.logits(ids, masks, mode="gather")
    multiplied = mm.logits(ids, masks, mode="multiply")
    torch.testing.assert_close(gathered, multiplied, atol=1e-5, rtol=1e-5)
    dense = model(input_ids=ids).logits
    assert (gathered - dense).abs().max() > 1e-2, "masks must change the output"
    sliced = slice_model(model, masks)
    torch.testing.assert_close(sliced(input_ids=ids).logits, gathered, atol=1e-5, rtol=1e-5)
    save_pruned(sliced, tmp_path / "pruned")
    assert (tmp_path / "pruned" / "model.safetensors").exists()
    reloaded = load_pruned(tmp_path / "pruned")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, gathered, atol=1e-5, rtol=1e-5)
    # per-layer widths reach the saved config; dropped layer is gone
    cfg = reloaded.config
    kept = masks.kept_layer_indices()
    assert cfg.num_hidden_layers == len(kept) and cfg.pgprune_kept_layers == kept
    assert cfg.pgprune_kv_heads == [int(masks.heads[i].sum()) for i in kept]
    assert cfg.pgprune_intermediate == [int(masks.channels[i].sum()) for i in kept]
    n_params = sum(p.numel() for p in reloaded.parameters())
    assert n_params == mm.layout.total_params(masks)
    out = reloaded.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_full_mask_matches_hf_forward():
    model = make_tiny_model("llama", n_heads=4, n_kv=2)
    mm = MaskedModel(model)
    ids = torch.randint(0, 300, (3, 11))
    torch.testing.assert_close(mm.logits(ids), model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mm.logits(ids, Masks.full(mm.layout)), model(input_ids=ids).logits, atol=1e-5,
                               rtol=1e-5)
    loss = mm.loss(ids)
    assert abs(loss - float(model(input_ids=ids, labels=ids).loss.detach())) < 1e-4


def test_masked_forward_does_not_modify_model():
    model = make_tiny_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mm = MaskedModel(model)
    mm.logits(torch.randint(0, 300, (1, 7)), random_masks(mm.layout, 0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sliced_model_can_be_pruned_again(tmp_path):
    model = make_tiny_model("llama", n_heads=4, n_kv=2)
    first = slice_model(model, random_masks(MaskedModel(model).layout, 5, drop_layer=False))
    mm2 = MaskedModel(first)
    masks2 = random_masks(mm2.layout, 6)
    ids = torch.randint(0, 300, (2, 9))
    second = slice_model(first, masks2)
    torch.testing.assert_close(second(input_ids=ids).logits, mm2.logits(ids, masks2), atol=1e-5, rtol=1e-5)
    assert second.config.pgprune_kept_layers == [0, 2]


def test_guards_reject_headless_layers_and_bad_shapes():
    model = make_tiny_model("llama", n_heads=4, n_kv=2)
    mm = MaskedModel(model)
    m = Masks.full(mm.layout)
    m.heads[0][:] = False
    with pytest.raises(BudgetError, match="layer 0 keeps 0 of 2 KV groups"):
        slice_model(model, m)
    m.layers[0] = False  # dropping the layer makes it legal
    slice_model(model, m)
    m2 = Masks.full(mm.layout)
    m2.layers[:] = False
    with pytest.raises(BudgetError, match="all layers"):
        mm.logits(torch.zeros(1, 4, dtype=torch.long), m2)
    m3 = Masks.full(mm.layout)
    m3.channels[1] = torch.ones(5, dtype=torch.bool)
    with pytest.raises(Exception, match="do not match"):
        slice_model(model, m3)


def test_masks_json_round_trip():
    model = make_tiny_model("llama")
    layout = MaskedModel(model).layout
    m = random_masks(layout, 9)
    back = Masks.from_json(m.to_json())
    for a, b in zip(m.heads + m.channels, back.heads + back.channels):
        assert torch.equal(a, b)
    assert torch.equal(m.layers, back.layers)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mean_compensation_masked_equals_sliced(arch):
    from pgprune.pruning.run import compensation_biases
    from pgprune.scorers import compute_scores

    model = make_tiny_model(arch, n_heads=4, n_kv=2, layers=3)
    calib = torch.randint(0, 300, (8, 16), generator=torch.Generator().manual_seed(0))
    flap = compute_scores("flap", model, calib, bias_compensation=True, progress=False)
    mm = MaskedModel(model)
    masks = random_masks(mm.layout, 3, drop_layer=False)
    masks.heads[2][:] = False
    masks.heads[2][0] = True
    ids = torch.randint(0, 300, (2, 9))
    plain = mm.logits(ids, masks)
    mm.set_compensation(flap["bias"])
    gathered, multiplied = mm.logits(ids, masks), mm.logits(ids, masks, mode="multiply")
    torch.testing.assert_close(gathered, multiplied, atol=1e-5, rtol=1e-5)
    assert (gathered - plain).abs().max() > 1e-2
    sliced = slice_model(model, masks, extra_bias=compensation_biases(model, masks, flap))
    torch.testing.assert_close(sliced(input_ids=ids).logits, gathered, atol=1e-5, rtol=1e-5)
    # with nothing removed the compensation is exactly zero
    full = Masks.full(mm.layout)
    torch.testing.assert_close(mm.logits(ids, full), model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
