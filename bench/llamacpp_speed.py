"""llama.cpp speed of pruned models exported as GGUF (llama.cpp's deci architecture) vs the dense model.

The dense model and every pruned cell are written with :func:`pgprune.hf.gguf.save_gguf` (``--gguf-dtype``, default
float16) into a temporary folder. A cell ``method:sparsity[:layout]`` is the pipeline's masks
(``artifacts/masks/<method>/s<sparsity>/``) sliced with their compensation, the refit recomputed from
``data/prepared/calib.safetensors`` like stages/export.py (``random``: random masks keeping the same fraction of
every layer, no compensation); layout ``heterogeneous`` (default) or ``uniform`` (the stock LlamaForCausalLM: the
pipeline's masks when they keep the same widths in every layer, else the method run here in the uniform layout
with params.yaml's settings on the calibration blocks, MLP widths in ``--round-to`` blocks). A cell at a sparsity
the pipeline did not compute (30% is not a default cell) is pruned here the same way. llama-cpp-python then
measures, with ``--threads`` threads for every model:

* prefill: tokens/s of one ``--prompt-len``-token prompt evaluated at once (an empty cache);
* decode: tokens/s of ``--new-tokens`` single-token steps after that prompt;

dense and pruned runs interleaved, one warm-up round, median of ``--repeats``. It prints
``RESULT llamacpp_prefill_speedup_<method>_s<S>[_uniform]=x`` and ``RESULT llamacpp_decode_speedup_...=x``
(pruned / dense tokens/s), and ``RESULT llamacpp_prefill_speedup=x`` / ``llamacpp_decode_speedup=x`` for the
``--headline`` cell (pg at 0.5). ``--ppl``: llama.cpp's perplexity of each model on the held-out blocks
(data/prepared/eval, ``eval.ppl_seq_len`` tokens, the first ``--ppl-blocks``) against transformers' perplexity
(pgprune.eval.perplexity) of the same model on the same blocks: ``RESULT llamacpp_ppl_ratio_<cell>_<corpus>=x``
(llama.cpp / transformers; the GGUF's float16 matrices and KV cache move it by a few 1e-3). ``--synthetic``: a
random-weight model of that shape (speed only); its cells prune it with the method itself on random tokens.

    python -m bench.llamacpp_speed                    # pg at 0.2, 0.3, 0.5 (after dvc repro; 0.3 searched here)
    python -m bench.llamacpp_speed --cells pg:0.5 flap:0.5 random:0.5 random:0.5:uniform --ppl --ppl-blocks 32
    python -m bench.llamacpp_speed --synthetic tinyllama-1.1b --cells random:0.5 flap:0.5  # random weights
    python -m bench.llamacpp_speed --smoke                               # a tiny synthetic model, seconds

Needs llama-cpp-python (``pip install llama-cpp-python``).
"""
from __future__ import annotations

import importlib.util
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench._common import SYNTHETIC, cell_model, load, parser, smoke, uniform_masks
from pgprune.errors import PgpruneError
from pgprune.hf.gguf import DTYPES

REQUIRES = ("llama_cpp",)  # the modules this benchmark cannot run without
# --smoke: extra arguments -> the RESULT lines they must print (tests/test_bench_smoke.py)
SMOKE = {"--ppl": [rf"llamacpp_{k}_speedup_{c}" for k in ("prefill", "decode")
                   for c in (r"random_s0\.5", r"random_s0\.5_uniform", r"flap_s0\.5")]
         + ["llamacpp_prefill_speedup", "llamacpp_decode_speedup", r"llamacpp_ppl_ratio_dense_random",
            r"llamacpp_ppl_ratio_flap_s0\.5_random"]}
SMOKE_CELLS = ["random:0.5", "random:0.5:uniform", "flap:0.5"]
LAYOUTS = ("heterogeneous", "uniform")


def parse_cell(text: str) -> tuple[str, float, str]:
    """``method:sparsity[:layout]`` -> (method, sparsity, layout)."""
    parts = text.split(":")
    try:
        method, sparsity, layout = parts[0], float(parts[1]), (parts[2] if len(parts) > 2 else "heterogeneous")
    except (IndexError, ValueError):
        raise PgpruneError(f"--cells {text!r}; allowed: method:sparsity[:layout], e.g. pg:0.5 or "
                           "random:0.5:uniform") from None
    if layout not in LAYOUTS or len(parts) > 3:
        raise PgpruneError(f"--cells {text!r}: layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    return method, sparsity, layout


def cell_name(method: str, sparsity: float, layout: str) -> str:
    return f"{method}_s{sparsity:g}" + ("_uniform" if layout == "uniform" else "")


def synthetic_setup(args):
    """A synthetic model (``--synthetic``; ``--smoke``: the tiny one, its vocabulary the tokenizer's) with a
    byte-level BPE tokenizer trained here (the model's other ids are padding in the GGUF), random calibration and
    held-out blocks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = "the quick brown fox jumps over the lazy dog; a pruned model keeps the best heads and channels. " * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    shape = dict(SYNTHETIC[args.synthetic])
    if args.smoke:
        shape["vocab_size"] = len(tok)
    if shape["vocab_size"] < len(tok):
        raise PgpruneError(f"--synthetic {args.synthetic}: vocabulary {shape['vocab_size']} < the tokenizer's "
                           f"{len(tok)}; allowed: a shape with a larger vocabulary")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=2048, **shape)).eval()
    g = torch.Generator().manual_seed(0)
    t = 16 if args.smoke else 128
    calib = torch.randint(3, len(tok), (16, t), generator=g)  # [n, T]
    evals = {"random": torch.randint(3, len(tok), (2 if args.smoke else 8, 2 * t), generator=g)}
    return model, tok, calib, evals


def pruned_model(model, method: str, sparsity: float, layout: str, args, calib_fn):
    """The physically pruned model of one cell, with its compensation."""
    from pgprune.core.adapters import get_adapter
    from pgprune.hf.export import build_model

    lay = get_adapter(model).layout()
    if method == "random":
        return build_model(model, uniform_masks(lay, sparsity), None, layout=layout)
    if args.synthetic:  # the method itself on the synthetic model, calibrated on random tokens
        import pgprune

        calib = calib_fn()
        res = pgprune.prune(model, None, sparsity=sparsity, method=method, calibration=calib, layout=layout,
                            config={"data": {"seq_len": calib.shape[1], "calib_blocks": calib.shape[0]},
                                    "init": {"nsamples": min(8, calib.shape[0])}}, progress=False)
        return res.model
    model_, note = cell_model(model, method, sparsity, args.masks_dir, calib_fn, args.params, layout=layout,
                              round_to=args.round_to)
    if note:
        print(f"  {cell_name(method, sparsity, layout)}: {note}", flush=True)
    return model_


def open_llama(path: Path, args, n_ctx: int, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=args.threads,
                 n_threads_batch=args.threads, logits_all=logits_all, verbose=False)


def timings(llm, prompt: list[int], steps: list[int]) -> tuple[float, float]:
    """(prefill s, decode s) of one prompt and then single-token steps, from an empty cache."""
    llm.reset()  # eval() then drops the cache from position 0 on
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for t in steps:
        llm.eval([t])
    return t1 - t0, time.perf_counter() - t1


def llama_cpp_ppl(path: Path, blocks: torch.Tensor, args) -> float:
    """llama.cpp's perplexity on ``blocks`` [n, T]: the mean NLL of tokens 1..T-1 of each block given the ones
    before (pgprune.eval.perplexity's protocol), each block from an empty cache."""
    import numpy as np

    n, t = blocks.shape
    llm = open_llama(path, args, t, logits_all=True)
    nll, count = 0.0, 0
    try:
        for row in blocks.tolist():
            llm.reset()
            llm.eval(row)
            logits = torch.from_numpy(np.array(llm.scores[:t], dtype=np.float64))  # [T, vocab]
            target = torch.tensor(row[1:])
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum"))
            count += t - 1
    finally:
        llm.close()
    return math.exp(nll / count)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--cells", nargs="+", default=["pg:0.2", "pg:0.3", "pg:0.5"],
                    help="method:sparsity[:layout] (layout heterogeneous | uniform; method random: random masks)")
    ap.add_argument("--headline", default="pg:0.5", help="the cell of the plain llamacpp_*_speedup RESULT lines")
    ap.add_argument("--masks-dir", default="artifacts/masks")
    ap.add_argument("--data", default="data/prepared", help="calib.safetensors (refit) and eval/ (--ppl)")
    ap.add_argument("--params", default="params.yaml", help="eval.ppl_seq_len / ppl_blocks of --ppl")
    ap.add_argument("--gguf-dtype", default="float16", choices=list(DTYPES), help="matrices of the GGUF files")
    ap.add_argument("--round-to", type=int, default=64, help="a uniform cell pruned here: MLP widths in blocks of "
                    "this many channels (default 64, the search's channel blocks)")
    ap.add_argument("--tokenizer-pre", default="smollm", help="llama.cpp's pre-tokenizer name (SmolLM2: smollm)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ppl", action="store_true", help="also llama.cpp vs transformers perplexity")
    ap.add_argument("--ppl-blocks", type=int, default=None, help="held-out blocks per corpus (default eval.ppl_blocks)")
    ap.set_defaults(dtype="float32", threads=2, device="cpu")
    args = ap.parse_args()
    smoke(args, cells=SMOKE_CELLS, headline="flap:0.5", prompt_len=16, new_tokens=4, threads=1)
    missing = [m for m in REQUIRES if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"bench.llamacpp_speed needs {', '.join(missing)}: pip install llama-cpp-python")
    cells = [parse_cell(c) for c in args.cells]
    headline = parse_cell(args.headline)
    from pgprune.hf.gguf import save_gguf

    if args.synthetic:
        model, tok, calib, evals = synthetic_setup(args)
        calib_fn = lambda: calib  # noqa: E731
        args.tokenizer_pre = None
    else:
        from pgprune.config import load_params
        from pgprune.data.prepare import load_calibration, load_eval_data

        if args.threads:
            torch.set_num_threads(args.threads)
        model, tok = load(args)
        cache = {}

        def calib_fn():
            if "calib" not in cache:
                cache["calib"] = load_calibration(args.data)
            return cache["calib"]

        evals = {}
        if args.ppl:
            params = load_params(args.params) if Path(args.params).exists() else None
            if params is None:
                from pgprune.config import parse_params

                params = parse_params({})
            evals, _ = load_eval_data(args.data, tok, params)
    if args.ppl and args.ppl_blocks:
        evals = {k: v[:args.ppl_blocks] for k, v in evals.items()}
    with tempfile.TemporaryDirectory(prefix="llamacpp_speed_") as tmp:
        tmp = Path(tmp)
        tok_dir = tmp / "tokenizer"
        if args.synthetic:
            tok.save_pretrained(tok_dir)
        else:
            from pgprune.hf.loading import resolve

            tok_dir = Path(resolve(args.model))
        files = {"dense": tmp / "dense.gguf"}
        torch_models = {"dense": model}
        save_gguf(model, files["dense"], tok_dir, dtype=args.gguf_dtype, tokenizer_pre=args.tokenizer_pre)
        for method, sparsity, layout in cells:
            name = cell_name(method, sparsity, layout)
            t0 = time.perf_counter()
            pruned = pruned_model(model, method, sparsity, layout, args, calib_fn)
            info = save_gguf(pruned, tmp / f"{name}.gguf", tok_dir, dtype=args.gguf_dtype,
                             tokenizer_pre=args.tokenizer_pre)
            files[name] = tmp / f"{name}.gguf"
            heads = [b["heads"] for b in info["layers"]]
            ff = [b["ff"] for b in info["layers"]]
            print(f"{name}: {type(pruned).__name__}, {len(heads)} layers, query heads {min(heads)}-{max(heads)}, "
                  f"MLP channels {min(ff)}-{max(ff)}, {files[name].stat().st_size / 2**20:.1f} MiB "
                  f"(dense {files['dense'].stat().st_size / 2**20:.1f} MiB); built in {time.perf_counter() - t0:.0f} s")
            if args.ppl:
                torch_models[name] = pruned
            else:
                del pruned

        # --- speed: every model loaded, runs interleaved -------------------------------------------------------
        vocab = int(model.config.vocab_size)
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist()
        steps = torch.randint(3, vocab, (args.new_tokens,), generator=g).tolist()
        n_ctx = args.prompt_len + args.new_tokens + 8
        llms = {k: open_llama(p, args, n_ctx) for k, p in files.items()}
        times = {k: {"prefill": [], "decode": []} for k in llms}
        try:
            for rnd in range(1 + args.repeats):  # round 0 warms up
                for k, llm in llms.items():
                    pre, dec = timings(llm, prompt, steps)
                    if rnd:
                        times[k]["prefill"].append(pre)
                        times[k]["decode"].append(dec)
        finally:
            for llm in llms.values():
                llm.close()
        rate = {k: {"prefill": args.prompt_len / statistics.median(v["prefill"]),
                    "decode": args.new_tokens / statistics.median(v["decode"])} for k, v in times.items()}
        d = rate["dense"]
        print(f"model {args.synthetic or args.model}, GGUF {args.gguf_dtype}, {args.threads} threads, prompt "
              f"{args.prompt_len} tokens, {args.new_tokens} decode steps, median of {args.repeats}")
        print(f"  dense: prefill {d['prefill']:8.1f} tok/s, decode {d['decode']:7.1f} tok/s")
        for method, sparsity, layout in cells:
            name = cell_name(method, sparsity, layout)
            r = rate[name]
            print(f"  {name}: prefill {r['prefill']:8.1f} tok/s, decode {r['decode']:7.1f} tok/s")
            print(f"RESULT llamacpp_prefill_speedup_{name}={r['prefill'] / d['prefill']:.2f}")
            print(f"RESULT llamacpp_decode_speedup_{name}={r['decode'] / d['decode']:.2f}")
        head = cell_name(*headline)
        if head in rate:
            print(f"RESULT llamacpp_prefill_speedup={rate[head]['prefill'] / d['prefill']:.2f} ({head})")
            print(f"RESULT llamacpp_decode_speedup={rate[head]['decode'] / d['decode']:.2f} ({head})")

        # --- perplexity: llama.cpp vs transformers on the same blocks ------------------------------------------
        if args.ppl:
            from pgprune.eval.perplexity import perplexity

            for name, path in files.items():
                for corpus, blocks in evals.items():
                    ours = llama_cpp_ppl(path, blocks, args)
                    ref = perplexity(torch_models[name], blocks, batch_size=8)["ppl"]
                    print(f"  {name} {corpus}: llama.cpp {ours:.3f}, transformers {ref:.3f} ({blocks.shape[0]} "
                          f"blocks of {blocks.shape[1]})")
                    print(f"RESULT llamacpp_ppl_ratio_{name}_{corpus}={ours / ref:.4f}")


if __name__ == "__main__":
    main()
