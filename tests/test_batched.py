"""All K samples of a step in one forward: batched losses == separate masked forwards == sliced models."""
import pytest
import torch
from conftest import make_tiny_model

from pgprune.core.masked_forward import MaskedModel
from pgprune.core.masks import Masks
from pgprune.errors import PgpruneError
from pgprune.hf.slicing import slice_model

CASES = {
    "llama_mha": ("llama", dict(n_heads=4, n_kv=4)),
    "llama_gqa": ("llama", dict(n_heads=4, n_kv=2)),
    "mistral_gqa": ("mistral", dict(n_heads=4, n_kv=2)),
    "qwen2_bias": ("qwen2", dict(n_heads=6, n_kv=3, hidden=48)),
}


def sample_masks(layout, k, seed, drop_layers=True, p=0.5):
    """K different random masks; each keeps >= 1 group/channel per layer; some drop different layers."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(k):
        m = Masks.full(layout)
        for i in range(layout.num_layers):
            m.heads[i] = torch.rand(layout.kv_heads[i], generator=g) < p
            m.heads[i][torch.randint(0, layout.kv_heads[i], (1,), generator=g)] = True
            m.channels[i] = torch.rand(layout.intermediate[i], generator=g) < p
            m.channels[i][torch.randint(0, layout.intermediate[i], (1,), generator=g)] = True
        if drop_layers and j % 2 == 1:
            m.layers[j % layout.num_layers] = False
        out.append(m)
    return out


def random_means(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = layout.kv_heads[0] * layout.group_size * layout.head_dim
    return {"o_proj": [torch.randn(q, generator=g) for _ in range(layout.num_layers)],
            "down_proj": [torch.randn(n, generator=g) for n in layout.intermediate]}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("compensation", [False, True])
def test_batched_equals_separate(case, compensation):
    arch, kw = CASES[case]
    model = make_tiny_model(arch, **kw)
    mm = MaskedModel(model)
    if compensation:
        mm.set_compensation(random_means(mm.layout))
    ids = torch.randint(0, 300, (3, 13), generator=torch.Generator().manual_seed(1))
    for k in (1, 2, 3, 4):
        masks = sample_masks(mm.layout, k, seed=10 + k)
        one_by_one = torch.tensor([mm.loss(ids, m) for m in masks], dtype=torch.float64)
        sep = mm.sample_losses(ids, masks, mode="separate")
        bat = mm.sample_losses(ids, masks, mode="batched")
        assert sep.dtype == torch.float64 and sep.device.type == "cpu" and sep.shape == (k,)
        torch.testing.assert_close(sep, one_by_one, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(bat, sep, atol=2e-5, rtol=2e-5)
        if k > 1:
            assert bat.std() > 1e-3, "different masks must give different losses"
    # auto is separate on CPU
    torch.testing.assert_close(mm.sample_losses(ids, masks), sep, atol=0, rtol=0)


def test_batched_logits_equal_sliced_model_with_compensation():
    """Each sample's loss in a batch == the loss of the physically sliced, bias-compensated model."""
    from pgprune.pruning.run import compensation_biases
    from pgprune.scorers import compute_scores

    model = make_tiny_model("qwen2", n_heads=4, n_kv=2)
    calib = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(0))
    flap = compute_scores("flap", model, calib, bias_compensation=True, progress=False)
    mm = MaskedModel(model)
    mm.set_compensation(flap["bias"])
    masks = sample_masks(mm.layout, 3, seed=4)
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(2))
    bat = mm.sample_losses(ids, masks, mode="batched")
    for j, m in enumerate(masks):
        sliced = slice_model(model, m, extra_bias=compensation_biases(model, m, flap))
        ref = float(sliced(input_ids=ids, labels=ids).loss.detach())
        assert abs(float(bat[j]) - ref) < 1e-4


def test_layer_dropped_by_every_sample_and_samples_keeping_everything():
    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=4)
    mm = MaskedModel(model)
    mm.set_compensation(random_means(mm.layout, 3))
    masks = sample_masks(mm.layout, 3, seed=7, drop_layers=False)
    for m in masks:
        m.layers[2] = False  # nobody keeps layer 2
    masks.append(Masks.full(mm.layout))  # a sample that removes nothing (its compensation must be zero)
    masks[0].layers[0] = False
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(5))
    sep = mm.sample_losses(ids, masks, mode="separate")
    bat = mm.sample_losses(ids, masks, mode="batched")
    torch.testing.assert_close(bat, sep, atol=2e-5, rtol=2e-5)
    dense = MaskedModel(model).loss(ids)
    assert abs(float(sep[3]) - dense) < 1e-5  # full mask with compensation == dense model


def test_sample_mode_errors():
    model = make_tiny_model("llama")
    mm = MaskedModel(model)
    ids = torch.randint(0, 300, (1, 5))
    with pytest.raises(PgpruneError, match="sample mode 'fast' is not allowed"):
        mm.sample_losses(ids, [Masks.full(mm.layout)], mode="fast")
    with pytest.raises(PgpruneError, match=r"input_ids must be \[B, T>=2\]"):
        mm.sample_losses(ids[:, :1], [Masks.full(mm.layout)])
    assert mm.sample_losses(ids, []).shape == (0,)
