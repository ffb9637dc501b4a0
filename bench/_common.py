"""Shared set-up for the benchmarks: the embedded (or a given) model, random 50% masks, timing helpers."""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from pgprune.models import load_model, prepare_model  # noqa: E402

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
    return ap


# LLaMA shapes for benchmarks that need a bigger model than the embedded one (random weights: speed and
# memory only, never quality)
SYNTHETIC = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
    "llama-7b-2layers": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=32000),
}


def synthetic_model(name: str, dtype: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from pgprune.models import torch_dtype

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=2048, **SYNTHETIC[name])
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch_dtype(dtype))
    return model.eval(), None


def load(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "synthetic", None):
        return synthetic_model(args.synthetic, args.dtype, args.device)
    if args.model == str(BASE) and not (BASE / "config.json").exists():
        prepare_model("embedded:smollm2-135m", BASE)
    return load_model(args.model, args.dtype, args.device)


def uniform_masks(layout, sparsity: float, seed: int = 0):
    """Random masks keeping the fraction 1 - sparsity of KV groups and of channels in every layer."""
    from pgprune.allocation import masks_from_scores

    g = torch.Generator().manual_seed(seed)
    n = layout.n_units
    scores = {"heads": torch.rand(n["heads"], generator=g), "channels": torch.rand(n["channels"], generator=g)}
    return masks_from_scores(layout, scores, sparsity, allocation="uniform")


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


def interleaved(fns: dict, device: str, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each function, runs interleaved (a, b, a, b, ...) so drifts hit both alike."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
