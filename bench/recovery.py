"""Recovery: held-out perplexity of pruned models before and after a LoRA recovery, its tokens/s and peak memory.

For each ``--cells`` entry ``<method>:<sparsity>`` the pipeline's masks (artifacts/masks/<method>/s<S>, with their
compensation recipe, the refit recomputed on data/prepared's calibration blocks like the export stage) are sliced
out of the base model (models/base, float32; a sparsity the pipeline did not compute, e.g. 30%, is pruned here with
params.yaml's settings), then :func:`pgprune.recovery.lora.recover_model` trains LoRA adapters
for ``--steps`` (loss ``--loss``: kd distils the dense base model) on the local corpus's calibration documents
(never its held-out part) and merges them. Perplexity on the first ``--eval-blocks`` held-out blocks of each
evaluation corpus (data/prepared) before and after.

Prints per cell ``RESULT recover_ppl_<cell>[<corpus>]=<after>`` and ``RESULT recover_ppl_ratio_<cell>[<corpus>]=
<after / before>`` (the goal at 50%: <= 0.5 within 10 minutes), ``RESULT recover_time_s_<cell>=...``, and over the
run ``RESULT recover_tokens_per_s=...`` and ``RESULT recover_peak_memory_vs_weights=...`` (peak growth of the
process's memory during the recovery (adapters, optimiser state, activations, the student's and teacher's logits)
over the student's weight bytes; the teacher's weights are loaded before and not counted).

    python -m bench.recovery --cells pg:0.5 flap_refit:0.5 --steps 150     # after the pipeline (masks, data)
    python -m bench.recovery --smoke                                        # tiny synthetic model (seconds)
"""
from __future__ import annotations

import time
import typing

import torch

from bench._common import SMOKE_SHAPE, add_smoke, cell_model, synthetic_model, uniform_masks
from pgprune.core.adapters import get_adapter
from pgprune.eval.perplexity import perplexity
from pgprune.hf.export import build_model
from pgprune.hf.memory import current_memory, peak_memory, reset_peak_memory
from pgprune.recovery.lora import recover_model
from pgprune.recovery.settings import RecoverSettings

SMOKE = {"": [r"recover_ppl_ratio_random_s0\.5\[random\]", "recover_tokens_per_s", "recover_peak_memory_vs_weights"]}


def _args():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--masks", default="artifacts/masks")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--cells", nargs="+", default=["pg:0.5"], help="<method>:<sparsity> masks of the pipeline")
    ap.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks per corpus (default 64)")
    ap.add_argument("--eval-every", type=int, default=0, help="also measure the perplexity every N steps (the "
                    "curve: RESULT recover_curve_<cell>[<corpus>,<step>])")
    ap.add_argument("--threads", type=int, default=None)
    for name, f in RecoverSettings.model_fields.items():  # every number or choice of the settings
        flag = "--" + name.replace("_", "-")
        if f.annotation in (int, float):
            ap.add_argument(flag, type=f.annotation, default=None, help=f.description)
        elif typing.get_origin(f.annotation) is typing.Literal:
            ap.add_argument(flag, choices=typing.get_args(f.annotation), default=None, help=f.description)
    add_smoke(ap)
    return ap.parse_args()


def _settings(a) -> RecoverSettings:
    given = {n: getattr(a, n) for n in RecoverSettings.model_fields if getattr(a, n, None) is not None}
    return RecoverSettings.parse(given)


def _cells_smoke():
    """The tiny synthetic model with random 50% masks, random token blocks as text (the code path, not a figure)."""
    base, _ = synthetic_model(SMOKE_SHAPE, "float32", "cpu")
    masks = uniform_masks(get_adapter(base).layout(), 0.5)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, base.config.vocab_size, (32, 16), generator=g)
    evals = {"random": torch.randint(0, base.config.vocab_size, (4, 16), generator=g)}
    yield "random_s0.5", base, build_model(base, masks, None, layout="auto"), blocks, evals


def _cells(a, settings):
    from pgprune.config import load_params
    from pgprune.data.prepare import load_calibration, load_eval_data
    from pgprune.hf.loading import load_model
    from pgprune.recovery.run import training_blocks

    params = load_params(a.params)
    base, tok = load_model(a.model, "float32", "cpu")
    for p in base.parameters():
        p.requires_grad_(False)
    evals, _ = load_eval_data(a.data, tok, params)
    evals = {c: b[: a.eval_blocks] for c, b in evals.items()}
    blocks, desc = training_blocks("local", tok, params, settings)
    print(f"training data: {desc}")
    calib = load_calibration(a.data)  # [n, T]: a refit is recomputed on it, a missing cell pruned on it
    for cell in a.cells:
        method, s = cell.split(":")
        pruned, note = cell_model(base, method, float(s), a.masks, lambda: calib, a.params)
        if note:
            print(f"{method}:{s}: {note}", flush=True)
        yield f"{method}_s{s}", base, pruned, blocks, evals


def main() -> None:
    a = _args()
    if a.smoke:
        a.steps, a.batch_size, a.seq_len, a.max_blocks, a.warmup_ratio, a.eval_every = 2, 2, 16, 32, 0.0, 1
    settings = _settings(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    tokens, seconds, peak_ratio = 0, 0.0, 0.0
    for name, teacher, pruned, blocks, evals in (_cells_smoke() if a.smoke else _cells(a, settings)):
        before = {c: perplexity(pruned, b, progress=False)["ppl"] for c, b in evals.items()}
        weights = sum(p.numel() * p.element_size() for p in pruned.parameters())
        mem0 = current_memory("cpu")
        reset_peak_memory("cpu")
        t0 = time.perf_counter()
        curve_time = [0.0]

        def curve(step, model, name=name, evals=evals):
            if not a.eval_every or step % a.eval_every or step == settings.steps:
                return
            t = time.perf_counter()
            for c, b in evals.items():
                print(f"RESULT recover_curve_{name}[{c},{step}]={perplexity(model, b, progress=False)['ppl']:.4f}")
            curve_time[0] += time.perf_counter() - t

        rec = recover_model(pruned, blocks.clone(), settings, teacher=teacher if settings.loss == "kd" else None,
                            teacher_id="base", progress=not a.smoke, callback=curve)
        elapsed = time.perf_counter() - t0 - curve_time[0]  # the curve's evaluations are not the recovery's time
        peak_ratio = max(peak_ratio, (peak_memory("cpu") - mem0) / weights)
        tokens, seconds = tokens + rec.info["tokens"], seconds + elapsed
        for c, b in evals.items():
            after = perplexity(rec.model, b, progress=False)["ppl"]
            print(f"{name} {c}: perplexity {before[c]:.2f} -> {after:.2f}")
            print(f"RESULT recover_ppl_{name}[{c}]={after:.4f}")
            print(f"RESULT recover_ppl_before_{name}[{c}]={before[c]:.4f}")
            print(f"RESULT recover_ppl_ratio_{name}[{c}]={after / before[c]:.4f}")
            print(f"RESULT recover_curve_{name}[{c},0]={before[c]:.4f}")
            print(f"RESULT recover_curve_{name}[{c},{settings.steps}]={after:.4f}")
        print(f"RESULT recover_time_s_{name}={elapsed:.1f}")
        print(f"{name}: loss {rec.info['losses'][0]:.4f} -> {rec.info['losses'][-1]:.4f}, "
              f"{rec.info['tokens']:,} tokens in {elapsed:.0f} s")
        del rec, pruned
    print(f"settings: {settings.model_dump(mode='json')}")
    print(f"RESULT recover_tokens_per_s={tokens / seconds:.1f}")
    print(f"RESULT recover_peak_memory_vs_weights={peak_ratio:.3f}")


if __name__ == "__main__":
    main()
