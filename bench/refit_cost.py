"""Refit cost: peak memory and time of the sequential least-squares refit (pgprune.core.refit.refit_weights, what
every refit cell, export and `pgprune prune` run) on a model streamed one decoder layer at a time, next to its
weights.

A fresh child process per variant loads the model (``--offload none`` and the given ``--offload``), draws random
masks keeping 1 - sparsity of every layer's KV groups and channels, and refits them on ``--blocks`` random blocks of
``--seq-len`` tokens. Memory: on CUDA the peak allocated bytes, on the CPU the peak RSS growth over the process
before loading, divided by the weight bytes (RESULT refit_peak_memory_vs_weights; target <= 0.35 with offload disk,
like the search: one layer + the calibration activations + one module's Gram matrix and solve + the refit weights,
which are the result and stay in memory in the model's dtype; RESULT refit_anon_memory_vs_weights: the anonymous
memory alone, without the mapped weights). Time: RESULT refit_time_s (the streamed run) and
streamed_vs_inmemory_refit_time.

    python -m bench.refit_cost --synthetic tinyllama-1.1b --offload disk
    python -m bench.refit_cost --smoke --offload disk        # seconds on a CPU
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import torch

from bench._common import load_for_memory, parser, smoke, uniform_masks
from bench.search_cost import checkpoint
from pgprune.core.adapters import get_adapter
from pgprune.core.refit import refit_weights
from pgprune.hf.memory import current_memory, peak_memory, proc_status, reset_peak_memory

# --smoke: extra arguments -> the RESULT lines they must print (tests/test_bench_smoke.py)
SMOKE = {"--offload disk": ["refit_peak_memory_vs_weights", "refit_anon_memory_vs_weights", "refit_time_s",
                           "streamed_vs_inmemory_refit_time"]}
SMOKE_SETTINGS = dict(blocks=4, seq_len=16, batch=2)


def add_args(ap) -> None:
    ap.add_argument("--blocks", type=int, default=16, help="calibration blocks the refit propagates and fits on")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="blocks per forward (refit.batch_size)")
    ap.add_argument("--offload", choices=["none", "cpu", "disk"], default="disk")
    ap.add_argument("--checkpoint", default=None, help="internal: the checkpoint folder")
    ap.add_argument("--memory-child", default=None, choices=["none", "cpu", "disk"],
                    help="internal: measure one offload variant in this (fresh) process")


def child(args) -> dict:
    """Load (with offload ``args.memory_child``), refit random masks, report peak memory and seconds."""
    model, before, _, cuda = load_for_memory(args, args.memory_child)
    resident = (current_memory("cpu") - before) / 2 ** 20
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    layout = get_adapter(model).layout()
    masks = uniform_masks(layout, args.sparsity)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (args.blocks, args.seq_len), generator=g)  # [n, T]
    if not cuda:
        reset_peak_memory("cpu")
    # CPU: anonymous (must fit) and file-backed (mapped weights) memory, sampled every 5 ms and once at the end
    base = {k: (proc_status(k) or 0) for k in ("RssAnon:", "RssFile:")}
    peaks = dict(base)
    done = threading.Event()

    def sample() -> None:
        for k in peaks:
            peaks[k] = max(peaks[k], (proc_status(k) or 0))

    def sampler_loop() -> None:
        while not done.wait(0.005):
            sample()

    sampler = threading.Thread(target=sampler_loop, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    refit = refit_weights(model, masks, calib, batch_size=args.batch, progress=False)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    sample()
    result_mb = sum(w.numel() * w.element_size() + b.numel() * b.element_size()
                    for mods in refit.values() for w, b in mods.values()) / 2 ** 20
    peak = (peak_memory(args.device) if cuda else peak_memory("cpu") - before) / 2 ** 20
    anon = (peaks["RssAnon:"] - base["RssAnon:"]) / 2 ** 20  # peak growth during the refit (sampled every 5 ms)
    return {"offload": args.memory_child, "weights_mb": weights, "peak_mb": peak, "ratio": peak / weights,
            "anon_growth_mb": anon, "file_peak_mb": peaks["RssFile:"] / 2 ** 20,
            "resident_after_load_mb": resident, "refit_result_mb": result_mb, "seconds": seconds,
            "kind": "cuda max allocated (load + refit)" if cuda else
            "cpu peak RSS during the refit, over the RSS before loading the model"}


def run_child(args, folder: str, offload: str) -> dict:
    cmd = [sys.executable, "-m", "bench.refit_cost", "--memory-child", offload, "--checkpoint", folder, "--dtype",
           args.dtype, "--device", args.device, "--sparsity", str(args.sparsity), "--blocks", str(args.blocks),
           "--seq-len", str(args.seq_len), "--batch", str(args.batch)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"refit child ({offload}) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = parser(__doc__)
    add_args(ap)
    args = ap.parse_args()
    smoke(args, **SMOKE_SETTINGS)
    if args.memory_child:
        print(json.dumps(child(args)))
        return
    folder, tmp = checkpoint(args)
    try:
        runs = {o: run_child(args, folder, o) for o in dict.fromkeys(["none", args.offload])}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"model {args.synthetic or args.model} dtype {args.dtype} device {args.device} sparsity {args.sparsity} "
          f"refit on {args.blocks} blocks x {args.seq_len} tokens (batch {args.batch}), threads "
          f"{args.threads or torch.get_num_threads()}")
    for o, r in runs.items():
        print(f"  offload {o:5s}: weights {r['weights_mb']:.0f} MiB, refit peak {r['peak_mb']:.0f} MiB "
              f"({r['ratio']:.2f}x; the refit weights themselves {r['refit_result_mb']:.0f} MiB), {r['seconds']:.1f} s "
              f"({r['kind']})")
        if "anon_growth_mb" in r and r["file_peak_mb"]:  # Linux
            print(f"    of which anonymous memory grew by {r['anon_growth_mb']:.0f} MiB during the refit "
                  f"({r['anon_growth_mb'] / r['weights_mb']:.2f}x the weights); file-backed pages (the mapped "
                  f"weights, reclaimable) peaked at {r['file_peak_mb']:.0f} MiB")
    main_run = runs[args.offload]
    target = " (target <= 0.35)" if args.offload == "disk" else ""
    print(f"RESULT refit_peak_memory_vs_weights={main_run['ratio']:.2f} (offload {args.offload}){target}")
    if main_run["file_peak_mb"]:  # Linux (/proc/self/status)
        print(f"RESULT refit_anon_memory_vs_weights={main_run['anon_growth_mb'] / main_run['weights_mb']:.2f} "
              f"(offload {args.offload}; the refit's own working memory, without the mapped weights)")
    print(f"RESULT refit_time_s={main_run['seconds']:.2f} (offload {args.offload})")
    print(f"RESULT streamed_vs_inmemory_refit_time={main_run['seconds'] / runs['none']['seconds']:.3f} "
          f"(offload {args.offload} vs none)")


if __name__ == "__main__":
    main()
