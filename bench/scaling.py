"""Scaling: search steps per second and peak memory vs model size, one row per model, printed as markdown.

Rows: the embedded SmolLM2-135M (models/base, when prepared), a synthetic TinyLlama-1.1B shape in memory and with
offload disk, and a synthetic LLaMA-7B shape (hidden 4096, ffn 11008, 32 layers, 32 heads) with offload disk.
Synthetic checkpoints (random weights: speed and memory only) are written as safetensors to ``--workdir`` (reused
when present; a temporary folder deleted at the end by default). Every row runs in a fresh child process: it loads
the model, runs one search of 1 + ``--steps`` steps through the library's driver (pgprune.pruning.pg.run_pg_search,
as bench.search_cost; K samples of ``--batch`` x ``--seq-len`` tokens, mean compensation, the pipeline's default
init), times the steps after the first (its warm-up), and reports the peak (CUDA max allocated, or peak RSS
growth over the process before loading) and the time per step. The defaults are small for a 2-core CPU; on a GPU
use e.g. ``--device cuda --batch 8 --seq-len 128 --samples 4 --steps 5``.

    python -m bench.scaling
    python -m bench.scaling --rows tinyllama-1.1b:none llama-7b:disk --device cuda --batch 8 --seq-len 128
    python -m bench.scaling --smoke        # the tiny synthetic shape in memory and from disk: seconds on a CPU
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench._common import BASE, SMOKE_SHAPE, SYNTHETIC, add_smoke, write_synthetic_checkpoint

DEFAULT_ROWS = ["embedded:none", "tinyllama-1.1b:none", "tinyllama-1.1b:disk", "llama-7b:disk"]
# --smoke: extra arguments -> the RESULT lines they must print (tests/test_bench_smoke.py)
SMOKE = {"": [f"scaling_{SMOKE_SHAPE}_none_steps_per_s", f"scaling_{SMOKE_SHAPE}_none_peak_vs_weights",
              f"scaling_{SMOKE_SHAPE}_disk_steps_per_s", f"scaling_{SMOKE_SHAPE}_disk_peak_vs_weights"]}
SMOKE_SETTINGS = dict(rows=[f"{SMOKE_SHAPE}:none", f"{SMOKE_SHAPE}:disk"], dtype="float32", batch=1,
                      seq_len=16, samples=2, steps=1)


def child(args) -> dict:
    from bench._common import load_for_memory
    from bench.search_cost import random_inputs, search_runner
    from pgprune.core.masked_forward import MaskedModel
    from pgprune.hf.memory import peak_memory, reset_peak_memory

    model, before, load_s, cuda = load_for_memory(args, args.offload, release=False)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    scores, means, calib = random_inputs(MaskedModel(model), model.config.vocab_size, args)
    args.steps += 1  # the first step is the warm-up: search_runner times the steps after it
    run = search_runner(model, scores, means, calib, args, args.sample_mode)
    if not cuda:
        reset_peak_memory("cpu")
    step_s = run()
    peak = peak_memory(args.device) if cuda else peak_memory("cpu") - before
    return {"params": params, "weights": weights, "peak": peak, "step_s": step_s, "load_s": load_s,
            "kind": "CUDA max allocated" if cuda else "peak RSS growth"}


def checkpoint_for(name: str, args, workdir: Path) -> Path | None:
    if name == "embedded":
        return BASE if (BASE / "config.json").exists() else None
    folder = workdir / f"{name}-{args.dtype}"
    if not (folder / "config.json").exists():
        print(f"writing the synthetic {name} checkpoint to {folder} ...", file=sys.stderr, flush=True)
        write_synthetic_checkpoint(name, args.dtype, folder)
    return folder


def fmt_bytes(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS,
                    help=f"model:offload pairs; models: embedded, {', '.join(sorted(SYNTHETIC))}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--sample-mode", default="auto", choices=["auto", "batched", "separate"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=None, help="keep synthetic checkpoints here (default: a temporary folder)")
    add_smoke(ap)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--offload", default="none", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        for k, v in SMOKE_SETTINGS.items():
            setattr(args, k, v)
    if args.child:
        print(json.dumps(child(args)))
        return
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = tmp = Path(tempfile.mkdtemp(prefix="pgprune-scaling-"))
    results, notes = [], []
    try:
        for row in args.rows:
            name, _, offload = row.partition(":")
            offload = offload or "none"
            if name != "embedded" and name not in SYNTHETIC:
                raise SystemExit(f"unknown model {name!r}; allowed: embedded, {', '.join(sorted(SYNTHETIC))}")
            folder = checkpoint_for(name, args, workdir)
            if folder is None:
                notes.append(f"{name}: skipped, models/base is not prepared (run the pipeline's model stage)")
                continue
            cmd = [sys.executable, "-m", "bench.scaling", "--child", "--checkpoint", str(folder), "--offload", offload,
                   "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch), "--seq-len",
                   str(args.seq_len), "--samples", str(args.samples), "--steps", str(args.steps), "--sparsity",
                   str(args.sparsity), "--sample-mode", args.sample_mode]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            print(f"running {name} offload {offload} ...", file=sys.stderr, flush=True)
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                notes.append(f"{name} offload {offload}: failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(model="SmolLM2-135M (embedded)" if name == "embedded" else f"{name} (synthetic)",
                     offload=offload)
            results.append(r)
            if tmp is not None and name in SYNTHETIC and not any(x.startswith(name + ":") for x in
                                                                 args.rows[args.rows.index(row) + 1:]):
                shutil.rmtree(folder, ignore_errors=True)  # disk space: drop a checkpoint no later row reads
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    mode = args.sample_mode if args.sample_mode != "auto" else ("batched" if args.device.startswith("cuda")
                                                                  else "separate")
    print(f"\ndevice {args.device}, {args.dtype}, K={args.samples} samples x {args.batch} x {args.seq_len} tokens per "
          f"step, sample mode {mode}, sparsity {args.sparsity}, {args.steps} timed steps after 1 warm-up\n")
    print("| model | params | weights | offload | steps/s | s/step | peak memory | peak / weights |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['params'] / 1e9:.2f}B | {fmt_bytes(r['weights'])} | {r['offload']} | "
              f"{1 / r['step_s']:.3f} | {r['step_s']:.2f} | {fmt_bytes(r['peak'])} | {r['peak'] / r['weights']:.2f} |")
    kind = results[0]["kind"] if results else ""
    print(f"\npeak memory: {kind} (load + search).")
    for n in notes:
        print(f"note: {n}")
    for r in results:
        key = r["model"].split(" ")[0].replace("-", "_").replace(".", "_").lower()
        print(f"RESULT scaling_{key}_{r['offload']}_steps_per_s={1 / r['step_s']:.4f}")
        print(f"RESULT scaling_{key}_{r['offload']}_peak_vs_weights={r['peak'] / r['weights']:.3f}")


if __name__ == "__main__":
    main()
