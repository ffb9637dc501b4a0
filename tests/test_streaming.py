"""Layer streaming and placement: a model whose decoder layers are read from disk one at a time (offload disk),
copied per use (offload cpu), or split over CPU memory and disk by accelerate (device_map auto) gives the same
losses, scorer statistics, perplexity and sliced weights as the in-memory model; data parallel over samples too."""
import sys

import pytest
import torch
from conftest import make_tiny_model
from test_batched import random_means, sample_masks

from pgprune.core.masked_forward import MaskedModel
from pgprune.core.masks import Masks
from pgprune.core.placement import ParallelSampleLosses
from pgprune.core.weights import Placement, attach, is_streamed, layer_homes, require_in_memory
from pgprune.errors import MissingFileError, PgpruneError
from pgprune.eval.perplexity import perplexity
from pgprune.hf.loading import load_model
from pgprune.hf.slicing import slice_model
from pgprune.scorers import collect_activation_stats, flap_scores, shortgpt_scores, wanda_sp_scores

VOCAB = 300


def save(model, folder, tok, shard: str | None = None):
    model.save_pretrained(folder, max_shard_size=shard) if shard else model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer):
    """A GQA qwen2 (biases) and a llama MHA tiny model, saved as one safetensors file and sharded."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, (arch, kw) in {"qwen2": ("qwen2", dict(n_heads=4, n_kv=2, layers=4)),
                             "llama": ("llama", dict(n_heads=4, n_kv=4, layers=3))}.items():
        model = make_tiny_model(arch, **kw)
        out[name] = (model, save(model, root / name, tiny_tokenizer),
                     save(model, root / f"{name}-sharded", tiny_tokenizer, shard="30KB"))
    return out


def ids_batch(b=3, t=13, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


_VARIANTS: dict = {}


def variants(dense, folder, sharded):
    """name -> model, every streamed form of the same checkpoint (loaded once per checkpoint; read-only)."""
    if str(folder) not in _VARIANTS:
        _VARIANTS[str(folder)] = _load_variants(dense, folder, sharded)
    return _VARIANTS[str(folder)]


def _load_variants(dense, folder, sharded):
    disk, _ = load_model(folder, "float32", "cpu", offload="disk")
    disk_sharded, _ = load_model(sharded, "float32", "cpu", offload="disk")
    cpu, _ = load_model(folder, "float32", "cpu")
    attach(cpu, Placement(torch.device("cpu"), stream_resident=True))  # the offload-cpu path, run on a CPU
    # layer 0 (+ embeddings) fits the CPU budget, the rest goes to disk
    layer_bytes = sum(p.numel() * 4 for p in dense.model.layers[0].parameters())
    outside = sum(p.numel() * 4 for n, p in dense.named_parameters() if ".layers." not in n)
    split, _ = load_model(sharded, "float32", "cpu", device_map="auto",
                          max_memory={"cpu": outside + int(1.5 * layer_bytes)})
    return {"disk": disk, "disk_sharded": disk_sharded, "cpu_stream": cpu, "split": split}


def test_disk_offload_holds_no_layer_weights_and_split_uses_cpu_and_disk(checkpoints):
    dense, folder, sharded = checkpoints["qwen2"]
    models = variants(dense, folder, sharded)
    disk = models["disk"]
    assert is_streamed(disk) and not is_streamed(dense)
    held = {n for n, p in disk.named_parameters() if p.device.type != "meta"}
    assert held and all(".layers." not in n for n in held)
    assert all(p.device.type == "meta" for p in disk.model.layers.parameters())
    homes, _ = layer_homes(models["split"])
    assert homes[0] == "resident" and "disk" in homes, homes
    assert layer_homes(models["cpu_stream"])[0] == ["cpu"] * 4


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_streamed_losses_equal_in_memory(checkpoints, arch):
    dense, folder, sharded = checkpoints[arch]
    ref = MaskedModel(dense)
    means = random_means(ref.layout, 2)
    ids = ids_batch()
    masks = sample_masks(ref.layout, 3, seed=5)
    want = {"loss": ref.loss(ids), "masked": ref.loss(ids, masks[1]), "logits": ref.logits(ids, masks[0]),
            "sep": ref.sample_losses(ids, masks, "separate"), "bat": ref.sample_losses(ids, masks, "batched")}
    ref.set_compensation(means)
    want["comp"] = ref.sample_losses(ids, masks, "batched")
    assert (want["comp"] - want["bat"]).abs().max() > 1e-3
    for name, model in variants(dense, folder, sharded).items():
        mm = MaskedModel(model)
        assert mm.streamed
        assert mm.loss(ids) == pytest.approx(want["loss"], abs=1e-6), name
        assert mm.loss(ids, masks[1]) == pytest.approx(want["masked"], abs=1e-6), name
        torch.testing.assert_close(mm.logits(ids, masks[0]), want["logits"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mm.sample_losses(ids, masks, "separate"), want["sep"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mm.sample_losses(ids, masks, "batched"), want["bat"], atol=1e-6, rtol=1e-6)
        mm.set_compensation(means)
        torch.testing.assert_close(mm.sample_losses(ids, masks, "batched"), want["comp"], atol=1e-6, rtol=1e-6)


def test_streamed_scorer_statistics_and_scores(checkpoints):
    dense, folder, sharded = checkpoints["qwen2"]
    calib = torch.randint(3, VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))
    ref = collect_activation_stats(dense, calib, batch_size=2, progress=False)
    want = {"wanda_sp": wanda_sp_scores(dense, calib, batch_size=2, progress=False),
            "flap": flap_scores(dense, calib, batch_size=2, bias_compensation=True, progress=False),
            "shortgpt": shortgpt_scores(dense, calib, batch_size=2, progress=False)}
    for name, model in variants(dense, folder, sharded).items():
        st = collect_activation_stats(model, calib, batch_size=2, progress=False)
        assert st.n_tokens == ref.n_tokens
        for a, b in zip(st.o_proj + st.down_proj, ref.o_proj + ref.down_proj):
            assert a.n == b.n
            torch.testing.assert_close(a.mean, b.mean, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(a.var, b.var, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(a.sqmean, b.sqmean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(st.cos_sum, ref.cos_sum, atol=1e-5, rtol=1e-6)
        # shortgpt needs only the statistics; wanda_sp / flap read o_proj/down_proj weights (here of the dense
        # model: the streamed statistics must give the same scores)
        torch.testing.assert_close(shortgpt_scores(model, calib, batch_size=2, progress=False)["layers"],
                                   want["shortgpt"]["layers"], atol=1e-5, rtol=1e-5)
        for key in ("heads", "channels", "layers"):
            torch.testing.assert_close(wanda_sp_scores(dense, None, stats=st)[key], want["wanda_sp"][key],
                                       atol=1e-5, rtol=1e-4)
        fl = flap_scores(dense, None, stats=st, bias_compensation=True)
        for key in ("heads", "channels"):
            torch.testing.assert_close(fl[key], want["flap"][key], atol=1e-4, rtol=1e-4)


def test_streamed_perplexity_and_masked_perplexity(checkpoints):
    dense, folder, sharded = checkpoints["llama"]
    blocks = torch.randint(0, VOCAB, (7, 12), generator=torch.Generator().manual_seed(3))
    want = perplexity(dense, blocks, batch_size=3)
    masks = sample_masks(MaskedModel(dense).layout, 1, seed=8)[0]
    sliced = perplexity(slice_model(dense, masks), blocks, batch_size=3)
    for name, model in variants(dense, folder, sharded).items():
        got = perplexity(model, blocks, batch_size=3)
        assert got["tokens"] == want["tokens"] == 7 * 11 and got["blocks"] == 7
        assert got["nll"] == pytest.approx(want["nll"], rel=1e-6), name
        # masked perplexity through the executor == the sliced model's, also in sweeps of 3 blocks
        for sweep in (None, 3):
            m = perplexity(model, blocks, batch_size=2, masks=masks, sweep_blocks=sweep)
            assert m["nll"] == pytest.approx(sliced["nll"], rel=1e-5), (name, sweep)
    assert perplexity(MaskedModel(dense), blocks, batch_size=3)["nll"] == pytest.approx(want["nll"], rel=1e-6)


def test_slicing_a_streamed_model(checkpoints):
    dense, folder, sharded = checkpoints["qwen2"]
    masks = sample_masks(MaskedModel(dense).layout, 1, seed=2)[0]
    want = slice_model(dense, masks).state_dict()
    for name, model in variants(dense, folder, sharded).items():
        got = slice_model(model, masks).state_dict()
        assert sorted(got) == sorted(want)
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_refit_of_a_streamed_model_slices_to_the_in_memory_bytes(checkpoints, arch):
    """compensation refit on an offloaded model: the sequential refit streams the layers and slicing takes the refit
    kept columns without copying the model, so the pruned model is the in-memory one, byte for byte."""
    from pgprune.core.refit import refit_model

    dense, folder, sharded = checkpoints[arch]
    masks = sample_masks(MaskedModel(dense).layout, 1, seed=3)[0]
    calib = ids_batch(6, 16, seed=4)
    src, extra = refit_model(dense, masks, calib, batch_size=4, progress=False)
    want = slice_model(src, masks, extra).state_dict()
    for name, model in variants(dense, folder, sharded).items():
        src, extra = refit_model(model, masks, calib, batch_size=4, progress=False)
        assert src is model and is_streamed(model)
        got = slice_model(src, masks, extra).state_dict()
        assert sorted(got) == sorted(want)
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)


def _mapping_of(address: int) -> str:
    """The file (or "") behind the mapping of this process that holds ``address`` (Linux /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            if lo <= address < hi:
                return parts[5].strip() if len(parts) > 5 else ""
    return ""


def test_refit_of_a_disk_streamed_model_is_spilled_to_disk(checkpoints, tmp_path):
    """offload disk: each layer's refit weights are written out and mapped back as soon as they are fitted (the same
    bytes as kept in memory; file-backed, so they are not the process's anonymous memory), the spill files are gone
    once the refit returns (POSIX: unlinked while mapped), and loading set glibc's fixed mmap threshold."""
    import os

    from pgprune.core import weights
    from pgprune.core.refit import refit_weights

    dense, folder, sharded = checkpoints["llama"]
    masks = sample_masks(MaskedModel(dense).layout, 1, seed=3)[0]
    calib = ids_batch(6, 16, seed=4)
    want = refit_weights(dense, masks, calib, batch_size=4, progress=False)
    disk = variants(dense, folder, sharded)["disk"]
    runs = {"auto": refit_weights(disk, masks, calib, batch_size=4, progress=False),
            "folder": refit_weights(dense, masks, calib, batch_size=4, progress=False, spill=tmp_path),
            "off": refit_weights(disk, masks, calib, batch_size=4, progress=False, spill=False),
            "in memory": want}
    for name, got in runs.items():
        assert sorted(got) == sorted(want)
        for i in want:
            for mod in want[i]:
                for x, y in zip(got[i][mod], want[i][mod]):
                    assert torch.equal(x, y), (name, i, mod)
                    if sys.platform == "linux":
                        mapped = "pgprune-spill-" in _mapping_of(x.data_ptr())
                        assert mapped == (name in ("auto", "folder")), (name, i, mod)
    if os.name == "posix":
        assert list(tmp_path.iterdir()) == []  # the spill folder was made inside and removed
        assert weights._MMAP_FIXED == (weights._libc() is not False)
    with pytest.raises(PgpruneError, match="spill folder .* is not a directory"):
        refit_weights(dense, masks, calib, progress=False, spill=tmp_path / "missing")


def test_data_parallel_over_samples(checkpoints):
    dense, folder, sharded = checkpoints["qwen2"]
    ref = MaskedModel(dense)
    ref.set_compensation(random_means(ref.layout, 4))
    ids = ids_batch()
    masks = sample_masks(ref.layout, 5, seed=9)
    for model in (dense, variants(dense, folder, sharded)["disk"]):
        par = ParallelSampleLosses.from_model(model, ["cpu", "cpu"])
        par.set_compensation(random_means(ref.layout, 4))
        for mode in ("separate", "batched"):
            torch.testing.assert_close(par.sample_losses(ids, masks, mode), ref.sample_losses(ids, masks, "separate"),
                                       atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(par(ids, masks[:1], "separate"), ref.sample_losses(ids, masks[:1], "separate"),
                                   atol=0, rtol=0)
        par.close()
    with pytest.raises(PgpruneError, match="search.devices is empty"):
        ParallelSampleLosses.from_model(dense, [])


def test_loading_errors(checkpoints, tmp_path, tiny_tokenizer):
    dense, folder, _ = checkpoints["llama"]
    with pytest.raises(PgpruneError, match="offload='disk' and device_map='auto' both place the layers"):
        load_model(folder, offload="disk", device_map="auto")
    with pytest.raises(PgpruneError, match="offload='ram' is not allowed"):
        load_model(folder, offload="ram")
    (tmp_path / "nost").mkdir()
    dense.config.save_pretrained(tmp_path / "nost")
    tiny_tokenizer.save_pretrained(tmp_path / "nost")
    with pytest.raises(MissingFileError, match=r"no \*.safetensors files"):
        load_model(tmp_path / "nost", offload="disk")
    disk, _ = load_model(folder, offload="disk")
    with pytest.raises(PgpruneError, match="taylor needs the whole model in memory"):
        require_in_memory(disk, "taylor")
    require_in_memory(dense, "taylor")  # in memory: fine
    masks = Masks.full(MaskedModel(dense).layout)
    with pytest.raises(PgpruneError, match="masks need a Hugging Face model or a MaskedModel"):
        perplexity(lambda ids: None, ids_batch(), masks=masks)


def test_tied_embeddings_stream_from_disk(tmp_path, tiny_tokenizer):
    """SmolLM2-style checkpoints tie lm_head to the embeddings (no lm_head tensor in the file)."""
    from conftest import make_tiny_config
    from transformers import AutoModelForCausalLM

    cfg = make_tiny_config("llama", n_heads=4, n_kv=2)
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in dense.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    save(dense, tmp_path / "tied", tiny_tokenizer)
    disk, _ = load_model(tmp_path / "tied", offload="disk")
    assert disk.lm_head.weight is disk.model.embed_tokens.weight
    ids = ids_batch()
    assert MaskedModel(disk).loss(ids) == pytest.approx(MaskedModel(dense).loss(ids), abs=1e-6)
    final, inputs = MaskedModel(disk).hidden_states(ids, collect=True)
    ref_final, ref_inputs = MaskedModel(dense).hidden_states(ids, collect=True)
    torch.testing.assert_close(final, ref_final, atol=1e-6, rtol=1e-6)
    assert len(inputs) == len(ref_inputs) == 3


def test_streamed_scorers_end_to_end_and_taylor_refuses(checkpoints):
    """compute_scores on a streamed model (the scorers read each layer's weights through weights.layer_parts)
    equals the in-memory model; taylor, which back-propagates, names why it cannot run streamed."""
    from pgprune.scorers import compute_scores

    dense, folder, sharded = checkpoints["qwen2"]
    calib = torch.randint(3, VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))
    for name in ("wanda_sp", "flap", "magnitude"):
        want = compute_scores(name, dense, calib, batch_size=2)
        for variant, model in variants(dense, folder, sharded).items():
            got = compute_scores(name, model, calib, batch_size=2)
            for key in ("heads", "channels"):
                torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4, msg=f"{name} {variant}")
    with pytest.raises(PgpruneError, match="taylor scorer needs the whole model in memory"):
        compute_scores("taylor", variants(dense, folder, sharded)["disk"], calib, batch_size=2)


def test_slimgpt_prunes_a_streamed_model_to_the_in_memory_model(checkpoints):
    """`pgprune prune --method slimgpt --offload disk`: SlimGPT's sequential selection and refit stream the layers,
    and the exported model is the in-memory run's, byte for byte."""
    import pgprune

    dense, folder, sharded = checkpoints["llama"]
    calib = ids_batch(8, 16, seed=6)
    cfg = {"data": {"seq_len": 16, "calib_blocks": 8}, "init": {"nsamples": 8}, "refit": {"blocks": 8}}
    want = pgprune.prune(dense, None, sparsity=0.5, method="slimgpt", calibration=calib, config=cfg,
                         progress=False)
    disk = variants(dense, folder, sharded)["disk"]
    got = pgprune.prune(disk, None, sparsity=0.5, method="slimgpt", calibration=calib, config=cfg, progress=False)
    assert got.info["compensation"] == "refit" and got.masks.to_json() == want.masks.to_json()
    w, g = want.model.state_dict(), got.model.state_dict()
    assert sorted(g) == sorted(w) and all(torch.equal(g[k], w[k]) for k in w)
