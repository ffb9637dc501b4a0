"""CUDA checks (marked ``gpu``: run when a CUDA device is present, skipped otherwise; CI never needs them).

Batched == separate on the GPU and == the CPU result; streamed (offload cpu: pinned copies on a side stream,
offload disk, device_map auto over GPU/CPU/disk) == in-memory; bf16; the step makes no host synchronisation
besides copying the K losses; the memory plan bounds the measured CUDA peak."""
import warnings

import pytest
import torch
from conftest import make_tiny_model
from test_batched import random_means, sample_masks

from pgprune.core.masked_forward import MaskedModel
from pgprune.core.weights import layer_homes
from pgprune.hf.loading import load_model
from pgprune.hf.memory import peak_memory, plan, reset_peak_memory

pytestmark = pytest.mark.gpu
VOCAB = 300


def ids_batch(b=3, t=17, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,kw", [("llama", dict(n_heads=4, n_kv=2)), ("qwen2", dict(n_heads=6, n_kv=3, hidden=48))])
def test_batched_equals_separate_on_cuda(arch, kw):
    model = make_tiny_model(arch, **kw)
    cpu = MaskedModel(model)
    means = random_means(cpu.layout, 1)
    cpu.set_compensation(means)
    ids = ids_batch()
    masks = sample_masks(cpu.layout, 4, seed=3)
    want = cpu.sample_losses(ids, masks, "separate")
    gpu = MaskedModel(model.to("cuda"))
    gpu.set_compensation(means)
    sep = gpu.sample_losses(ids, masks, "separate")
    bat = gpu.sample_losses(ids, masks, "batched")
    auto = gpu.sample_losses(ids, masks)  # batched on CUDA
    assert sep.device.type == "cpu" and sep.dtype == torch.float64
    torch.testing.assert_close(bat, sep, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(auto, bat, atol=0, rtol=0)
    torch.testing.assert_close(sep, want, atol=1e-4, rtol=1e-4)


def test_bf16_batched_close_to_float32():
    model = make_tiny_model("llama", n_heads=4, n_kv=2)
    ids = ids_batch()
    masks = sample_masks(MaskedModel(model).layout, 4, seed=5)
    f32 = MaskedModel(model.to("cuda")).sample_losses(ids, masks, "batched")
    mm = MaskedModel(model.to(torch.bfloat16))
    bat, sep = mm.sample_losses(ids, masks, "batched"), mm.sample_losses(ids, masks, "separate")
    torch.testing.assert_close(bat, sep, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(bat, f32, atol=1e-1, rtol=3e-2)


def test_step_has_one_host_sync():
    model = make_tiny_model("llama", n_heads=4, n_kv=2).to("cuda")
    mm = MaskedModel(model)
    mm.set_compensation(random_means(mm.layout, 2))
    ids = ids_batch().cuda()
    masks = sample_masks(mm.layout, 4, seed=6)
    for mode in ("batched", "separate"):
        mm.sample_losses(ids, masks, mode)  # warm-up (lazy CUDA/library initialisation)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                mm.sample_losses(ids, masks, mode)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        assert len(syncs) == 1, (mode, [str(w.message)[:120] for w in syncs])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer):
    model = make_tiny_model("qwen2", n_heads=4, n_kv=2, layers=4)
    folder = tmp_path_factory.mktemp("gpu-ckpt")
    model.save_pretrained(folder, max_shard_size="40KB")
    tiny_tokenizer.save_pretrained(folder)
    return model, folder


def test_streamed_equals_in_memory_on_cuda(checkpoint):
    dense, folder = checkpoint
    ref = MaskedModel(load_model(folder, "float32", "cuda")[0])
    means = random_means(ref.layout, 3)
    ref.set_compensation(means)
    ids = ids_batch()
    masks = sample_masks(ref.layout, 3, seed=8)
    want = ref.sample_losses(ids, masks, "batched")
    layer_bytes = sum(p.numel() * 4 for p in dense.model.layers[0].parameters())
    outside = sum(p.numel() * 4 for n, p in dense.named_parameters() if ".layers." not in n)
    # 1 layer on the GPU, 1 in CPU memory (accelerate keeps room there for the largest offloaded module, here
    # the embedding or lm_head), 2 on disk
    largest = max(layer_bytes, dense.model.embed_tokens.weight.numel() * 4, dense.lm_head.weight.numel() * 4)
    split = dict(device_map="auto", max_memory={"0": outside + int(1.5 * layer_bytes),
                                                "cpu": largest + int(1.5 * layer_bytes)})
    for kw in (dict(offload="cpu"), dict(offload="disk"), split):
        model, _ = load_model(folder, "float32", "cuda", **kw)
        mm = MaskedModel(model)
        homes = layer_homes(model)[0]
        if "device_map" in kw:
            assert homes[0] == "resident" and "cpu" in homes and "disk" in homes, homes
        else:
            assert set(homes) == {kw["offload"]}
        mm.set_compensation(means)
        for mode in ("batched", "separate"):
            torch.testing.assert_close(mm.sample_losses(ids, masks, mode), want, atol=1e-5, rtol=1e-5)
        assert mm.loss(ids) == pytest.approx(ref.loss(ids), abs=1e-5)


def test_plan_bounds_the_measured_cuda_peak(checkpoint, tmp_path):
    dense, folder = checkpoint
    ids = ids_batch(4, 64)
    masks = sample_masks(MaskedModel(dense).layout, 4, seed=2)
    for offload in ("none", "disk"):
        torch.cuda.empty_cache()
        reset_peak_memory("cuda")
        model, _ = load_model(folder, "float32", "cuda", offload=offload)
        mm = MaskedModel(model)
        mm.sample_losses(ids, masks, "batched")
        measured = peak_memory("cuda")
        est = plan(folder, "float32", offload=offload, batch=4, seq_len=64, samples=4, device="cuda")
        assert measured <= est["rows"][f"offload {offload}"]["device_peak"], (offload, measured, est)
        del mm, model


def pg_search_on(device: str, mode: str):
    """The library's search driver (what the pipeline and the benchmarks run) on ``device``: channel blocks of 8
    (the blocks are expanded to channels before the masked forward), mean compensation, validation."""
    from pgprune.config import SearchParams
    from pgprune.pruning.pg import run_pg_search

    model = make_tiny_model("llama", n_heads=4, n_kv=2, ffn=48).to(device)
    lay = MaskedModel(model).layout
    g = torch.Generator().manual_seed(0)
    scores = {"heads": torch.rand(lay.n_units["heads"], generator=g),
              "channels": torch.rand(lay.n_units["channels"], generator=g)}
    p = SearchParams(steps=2, samples=4, batch_size=2, val_blocks=2, validate_every=1, checkpoint_every=0,
                     channel_group=8, sample_mode=mode)
    calib = torch.randint(0, VOCAB, (8, 16), generator=g)
    out = run_pg_search(model, calib, scores, p, sparsity=0.5, device=device, progress=False,
                        compensation=random_means(lay, 4))
    out.masks.validate(lay)
    return out


@pytest.mark.parametrize("mode", ["batched", "separate"])
def test_pg_search_with_channel_blocks_on_cuda(mode):
    out = pg_search_on("cuda", mode)
    assert out.result.steps_done == 2 and out.result.forward_passes > 0
    assert all(torch.isfinite(torch.tensor(h["loss_mean"])) for h in out.result.history if h["n_valid"])
