"""Shared set-up for the benchmarks: the embedded (or a given) model, random 50% masks, timing helpers, and the
``--smoke`` mode every benchmark has (a tiny synthetic model, 1-2 steps: seconds on a CPU; tests/test_bench_smoke.py
runs it and checks the ``RESULT`` lines each module promises in its ``SMOKE`` table)."""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from pgprune.hf.loading import load_model, prepare_model  # noqa: E402

BASE = Path("models/base")


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--model", default=str(BASE), help="prepared model folder, local checkpoint or hub id")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--synthetic", choices=sorted(SYNTHETIC), default=None,
                    help="a randomly initialised model of a larger LLaMA shape instead of --model")
    add_smoke(ap)
    return ap


def add_smoke(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--smoke", action="store_true",
                    help="smoke test: the tiny synthetic model, 1-2 steps, float32 (seconds on a CPU; the numbers "
                         "mean nothing, the code path is the real one)")


def smoke(args, **settings) -> None:
    """With ``--smoke``: the tiny synthetic float32 model, one repeat, and the module's own small ``settings``
    (attribute: value) in place of whatever was given."""
    if not getattr(args, "smoke", False):
        return
    for k, v in {"synthetic": SMOKE_SHAPE, "dtype": "float32", "repeats": 1, **settings}.items():
        setattr(args, k, v)


# LLaMA shapes for benchmarks that need a bigger model than the embedded one (random weights: speed and
# memory only, never quality)
SYNTHETIC = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
    "llama-7b-2layers": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=32000),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    # --smoke: two layers, 4 query heads in 2 KV groups, 4 channel blocks of 64 (the default channel_group)
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}
SMOKE_SHAPE = "tiny"


def synthetic_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=2048, **SYNTHETIC[name])


def synthetic_model(name: str, dtype: str, device: str):
    from transformers import LlamaForCausalLM

    from pgprune.hf.loading import torch_dtype

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(synthetic_config(name)).to(torch_dtype(dtype))
    return model.eval(), None


_ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_synthetic_checkpoint(name: str, dtype: str, folder: str | Path, seed: int = 0) -> Path:
    """A random checkpoint of a SYNTHETIC shape written tensor by tensor as safetensors + config.json, never
    holding the model in memory (a 7B shape needs ~13 GiB of disk in bf16, not of RAM). Matrices ~ N(0, 0.02),
    norms 1 (like the HF init)."""
    import json
    import struct

    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    from pgprune.hf.loading import torch_dtype

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = synthetic_config(name)
    dt = torch_dtype(dtype)
    with init_empty_weights():
        meta = LlamaForCausalLM(cfg)
    tensors = [(n, tuple(p.shape)) for n, p in meta.named_parameters()]
    size = torch.tensor([], dtype=dt).element_size()
    header, off = {}, 0
    for n, shape in tensors:
        nbytes = size * int(torch.Size(shape).numel())
        header[n] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for n, shape in tensors:
            if len(shape) == 1:
                t = torch.ones(shape, dtype=dt)
                f.write(t.view(torch.uint8).numpy().tobytes())
                continue
            rows = max(1, (1 << 24) // shape[1])
            for s in range(0, shape[0], rows):
                t = torch.empty(min(rows, shape[0] - s), shape[1]).normal_(0.0, 0.02, generator=g).to(dt)
                f.write(t.view(torch.uint8).numpy().tobytes())
    cfg.save_pretrained(folder)
    return folder


def load(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "synthetic", None):
        return synthetic_model(args.synthetic, args.dtype, args.device)
    if args.model == str(BASE) and not (BASE / "config.json").exists():
        prepare_model("embedded:smollm2-135m", BASE)
    return load_model(args.model, args.dtype, args.device)


def preimport(checkpoint) -> None:
    """Import what loading and searching import lazily (transformers' modeling code, accelerate, pgprune), so a
    memory measurement started afterwards counts the model and the search, not library code."""
    import accelerate  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    import pgprune.core.masked_forward  # noqa: F401
    import pgprune.core.placement  # noqa: F401
    import pgprune.hf.loading  # noqa: F401
    import pgprune.pruning.pg  # noqa: F401

    cfg = AutoConfig.from_pretrained(pgprune.hf.loading.resolve(str(checkpoint)))
    tiny = {**cfg.to_dict(), "num_hidden_layers": 1, "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8}
    AutoModelForCausalLM.from_config(cfg.__class__(**tiny))


def load_for_memory(args, offload: str, release: bool = True):
    """The start of a memory measurement in a fresh child process: import the libraries first (they are not the
    measured memory), set the threads, start CUDA's peak counter, then load ``args.checkpoint`` with ``offload``
    (and, with ``release``, hand memory freed while loading back to the OS). Returns (model, the process's CPU
    bytes before loading, load seconds, whether the device is CUDA)."""
    from pgprune.hf.loading import load_weights, release_unused_memory
    from pgprune.hf.memory import current_memory, reset_peak_memory

    preimport(args.checkpoint)
    cuda = str(args.device).startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.cuda.init()
        reset_peak_memory(args.device)
    before = current_memory("cpu")
    t0 = time.perf_counter()
    model = load_weights(args.checkpoint, args.dtype, args.device, offload=offload)
    load_s = time.perf_counter() - t0
    if release:
        release_unused_memory()
    return model, before, load_s, cuda


def uniform_masks(layout, sparsity: float, seed: int = 0):
    """Random masks keeping the fraction 1 - sparsity of KV groups and of channels in every layer."""
    from pgprune.core.allocation import masks_from_scores

    g = torch.Generator().manual_seed(seed)
    n = layout.n_units
    scores = {"heads": torch.rand(n["heads"], generator=g), "channels": torch.rand(n["channels"], generator=g)}
    return masks_from_scores(layout, scores, sparsity, allocation="uniform")


def cell_model(model, method: str, sparsity: float, masks_dir, calib_fn, params, *, layout: str | None = None,
               round_to: int | None = None):
    """(the pruned model of the cell ``method`` at ``sparsity``, a note or None). The pipeline's masks
    (``masks_dir/<method>/s<S>/``) sliced with their compensation (a refit recomputed on ``calib_fn()`` [n, T], like
    stages/export.py), exported in ``layout`` (None: "auto"). A cell the pipeline did not compute (a sparsity outside
    compare.sparsities, e.g. 30%), or the uniform layout of a cell whose widths differ per layer (a metric's global
    allocation), is pruned here by ``pgprune.prune`` with ``params`` (a params.yaml path) on ``calib_fn()`` (uniform:
    MLP widths in blocks of ``round_to`` channels); the note says so."""
    import pgprune
    from pgprune.core.adapters import get_adapter
    from pgprune.core.compensation import compensated_source
    from pgprune.core.handoff import load_masks, load_recipe
    from pgprune.hf.export import build_model

    lay = get_adapter(model).layout()
    folder = Path(masks_dir) / method / f"s{sparsity:g}"
    computed = (folder / "masks.json").is_file()
    loaded = load_masks(folder, lay) if computed else None
    if loaded is None or (layout == "uniform" and not loaded[0].is_uniform()):
        res = pgprune.prune(model, None, sparsity=sparsity, method=method, calibration=calib_fn(), layout=layout,
                            round_to=round_to if layout == "uniform" else None, config=params, progress=False)
        why = "not in the pipeline's masks" if loaded is None else "the uniform layout"
        rep = res.info["report"]
        return res.model, (f"pruned here ({why}; {res.info['compensation']} compensation; decoder-linear sparsity "
                           f"{rep.get('prunable_sparsity', float('nan')):.3f})")
    masks, extra = loaded
    recipe = load_recipe(folder)
    src, extra = compensated_source(model, masks, extra, recipe, calib_fn() if recipe.kind == "refit" else None)
    return build_model(src, masks, extra, layout=layout or "auto"), None


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device: str, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def self_timed(fn):
    """Mark ``fn`` as returning its own time in seconds (for :func:`interleaved`)."""
    fn.self_timed = True
    return fn


def interleaved(fns: dict, device: str, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each function, runs interleaved (a, b, a, b, ...) so drifts hit both alike. A function
    marked :func:`self_timed` times itself: its return value is its time (e.g. seconds per search step)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            own = f()
            sync(device)
            times[k].append(float(own) if getattr(f, "self_timed", False) else time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
