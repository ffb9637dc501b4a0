"""Search cost: step time and peak memory of the policy-gradient search, measured side by side in one run.

Step time: real search steps, run by the library's own driver (pgprune.pruning.pg.run_pg_search: groups, channel
blocks, init, the pipeline's loss function; sample K masks, evaluate them, estimator, projection; mean compensation
on, the pipeline's default settings but no validation), timed per step from the second step on (the first step of
every run is its warm-up), interleaved with:
* K dense forwards of the same batch (RESULT search_step_vs_K_dense);
* with ``--sample-mode batched|separate``: the other sample mode (RESULT batched_vs_separate_step_time: one forward
  over K*B rows vs K gathered forwards; GPU target <= 0.6 at K=4);
* with ``--offload cpu|disk``: the same search on the streamed model, one decoder layer at a time
  (RESULT streamed_vs_inmemory_step_time).
Memory (RESULT search_peak_memory_vs_weights): a fresh child process loads the model (streamed with --offload)
and runs the search; on CUDA the peak allocated / weight bytes, on the CPU the peak RSS growth over the process
before loading / weight bytes (target <= 1.5 in memory, <= 0.35 with offload disk: one layer + activations +
search state). A --synthetic model is first written to a temporary folder as safetensors, so every variant
(and disk offload) reads the same checkpoint.

    python -m bench.search_cost --synthetic tinyllama-1.1b --offload disk
    python -m bench.search_cost --synthetic tinyllama-1.1b --sample-mode batched
    python -m bench.search_cost --smoke --offload disk --sample-mode batched   # seconds on a CPU
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench._common import (BASE, interleaved, load_for_memory, parser, self_timed, smoke,
                           write_synthetic_checkpoint)
from pgprune.config import SearchParams
from pgprune.core.masked_forward import MaskedModel
from pgprune.hf.loading import load_weights, prepare_model
from pgprune.hf.memory import current_memory, peak_memory, reset_peak_memory
from pgprune.pruning.pg import run_pg_search

# --smoke: extra arguments -> the RESULT lines they must print (tests/test_bench_smoke.py)
SMOKE = {"--offload disk --sample-mode batched": ["search_step_vs_K_dense", "batched_vs_separate_step_time",
                                                  "streamed_vs_inmemory_step_time",
                                                  "search_peak_memory_vs_weights"]}
SMOKE_SETTINGS = dict(batch=2, seq_len=16, samples=2, steps=2)


def add_args(ap):
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--samples", type=int, default=None, help="K (default 2; 4 with --sample-mode)")
    ap.add_argument("--steps", type=int, default=2, help="search steps per timed run (>= 2: the first of each run "
                    "is not timed)")
    ap.add_argument("--offload", choices=["none", "cpu", "disk"], default="none")
    ap.add_argument("--sample-mode", choices=["auto", "batched", "separate"], default="auto")
    ap.add_argument("--checkpoint", default=None, help="internal: the checkpoint folder")
    ap.add_argument("--memory-child", action="store_true", help="internal: measure memory in a fresh process")


def search_params(args, mode: str) -> SearchParams:
    return SearchParams(steps=args.steps, samples=args.samples, batch_size=args.batch, checkpoint_every=0,
                        val_blocks=0, sample_mode=mode)


def random_inputs(masked: MaskedModel, vocab: int, args, seed: int = 0):
    """Init scores, compensation means and calibration blocks (random; speed and memory only)."""
    g = torch.Generator().manual_seed(seed)
    lay = masked.layout
    n = lay.n_units
    scores = {"heads": torch.rand(n["heads"], generator=g), "channels": torch.rand(n["channels"], generator=g)}
    q = lay.kv_heads[0] * lay.group_size * lay.head_dim
    means = {"o_proj": [0.1 * torch.randn(q, generator=g) for _ in range(lay.num_layers)],
             "down_proj": [0.1 * torch.randn(c, generator=g) for c in lay.intermediate]}
    calib = torch.randint(0, vocab, (args.batch * 4, args.seq_len), generator=g)
    return scores, means, calib


def search_runner(model, scores, means, calib, args, mode: str):
    """A function running one search of ``args.steps`` steps through the library's driver (run_pg_search) and
    returning the mean seconds of its steps after the first (set-up, the first step and the final masks excluded)."""
    p = search_params(args, mode)

    @self_timed
    def run() -> float:
        ends = []
        run_pg_search(model, calib, scores, p, sparsity=args.sparsity, seed=0, device=args.device, progress=False,
                      compensation=means, on_step=lambda entry: ends.append(time.perf_counter()))
        return (ends[-1] - ends[0]) / (len(ends) - 1)

    return run


def checkpoint(args) -> tuple[str, Path | None]:
    """(model folder, temporary folder to delete or None)."""
    if args.checkpoint:
        return args.checkpoint, None
    if args.synthetic:
        tmp = Path(tempfile.mkdtemp(prefix="pgprune-bench-"))
        print(f"writing the synthetic {args.synthetic} checkpoint ({args.dtype}) to {tmp} ...", flush=True)
        write_synthetic_checkpoint(args.synthetic, args.dtype, tmp)
        return str(tmp), tmp
    if args.model == str(BASE) and not (BASE / "config.json").exists():
        prepare_model("embedded:smollm2-135m", BASE)
    return args.model, None


def memory_child(args) -> dict:
    model, before, _, cuda = load_for_memory(args, args.offload)
    resident = (current_memory("cpu") - before) / 2 ** 20
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    scores, means, calib = random_inputs(MaskedModel(model), model.config.vocab_size, args)
    run = search_runner(model, scores, means, calib, args, args.sample_mode)
    if not cuda:
        reset_peak_memory("cpu")
    run()
    if cuda:
        peak = peak_memory(args.device) / 2 ** 20
        return {"weights_mb": weights, "peak_mb": peak, "ratio": peak / weights, "host_mb": resident,
                "kind": "cuda max allocated (load + search)"}
    peak = (peak_memory("cpu") - before) / 2 ** 20
    return {"weights_mb": weights, "peak_mb": peak, "ratio": peak / weights, "resident_after_load_mb": resident,
            "search_extra_mb": peak - resident,
            "kind": "cpu peak RSS during the search, over the RSS before loading the model"}


def child_args(args, folder: str) -> list[str]:
    cmd = [sys.executable, "-m", "bench.search_cost", "--memory-child", "--checkpoint", folder, "--dtype",
           args.dtype, "--device", args.device, "--sparsity", str(args.sparsity), "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--samples", str(args.samples), "--steps", str(args.steps), "--offload",
           args.offload, "--sample-mode", args.sample_mode]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


def main():
    ap = parser(__doc__)
    add_args(ap)
    args = ap.parse_args()
    smoke(args, **SMOKE_SETTINGS)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step of each run is not timed)")
    if args.samples is None:
        args.samples = 4 if args.sample_mode != "auto" else 2
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    folder, tmp = checkpoint(args)
    try:
        model = load_weights(folder, args.dtype, args.device)
        mm = MaskedModel(model)
        scores, means, calib = random_inputs(mm, model.config.vocab_size, args)
        mm.set_compensation(means)
        ids = calib[: args.batch].to(args.device)
        mode = args.sample_mode
        fns = {"search step": search_runner(model, scores, means, calib, args, mode)}
        dense_key = f"{args.samples} dense forwards"

        def dense_forwards():  # K forwards of one batch: the dense cost of one step
            for _ in range(args.samples):
                mm.loss(ids)

        fns[dense_key] = dense_forwards
        other = {"batched": "separate", "separate": "batched"}.get(mode)
        if other:
            fns[f"search step {other}"] = search_runner(model, scores, means, calib, args, other)
        if args.offload != "none":
            streamed = load_weights(folder, args.dtype, args.device, offload=args.offload)
            fns["search step streamed"] = search_runner(streamed, scores, means, calib, args, mode)
        t = interleaved(fns, args.device, args.repeats)
        print(f"model {args.synthetic or args.model} dtype {args.dtype} device {args.device} batch "
              f"{args.batch}x{args.seq_len} K={args.samples} sparsity {args.sparsity} sample mode {mode} "
              f"offload {args.offload} threads {torch.get_num_threads()}")
        for k, v in t.items():
            print(f"  {k:26s} {v * 1000:10.1f} ms per step")
        print(f"RESULT search_step_vs_K_dense={t['search step'] / t[dense_key]:.3f} (< 1: masked forwards cost "
              "less than dense ones)")
        if other:
            b, s = (t["search step"], t[f"search step {other}"])
            if mode == "separate":
                b, s = s, b
            print(f"RESULT batched_vs_separate_step_time={b / s:.3f} (K={args.samples}; GPU target <= 0.6)")
        if args.offload != "none":
            print(f"RESULT streamed_vs_inmemory_step_time={t['search step streamed'] / t['search step']:.3f} "
                  f"(offload {args.offload})")
        del fns, mm, model
        if args.offload != "none":
            del streamed
        out = subprocess.run(child_args(args, folder), capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"memory child failed:\n{out.stderr[-4000:]}")
        mem = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  weights {mem['weights_mb']:.0f} MiB, search peak {mem['peak_mb']:.0f} MiB ({mem['kind']})")
        if "search_extra_mb" in mem:
            print(f"  of which: process after loading {mem['resident_after_load_mb']:.0f} MiB, search working "
                  f"memory {mem['search_extra_mb']:.0f} MiB ({mem['search_extra_mb'] / mem['weights_mb']:.2f}x "
                  "weights)")
        target = "0.35" if args.offload == "disk" else "1.5"
        print(f"RESULT search_peak_memory_vs_weights={mem['ratio']:.2f} (offload {args.offload}; target <= {target})")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
