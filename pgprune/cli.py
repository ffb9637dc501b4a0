"""The `pgprune` command (console script ``pgprune = "pgprune.cli:main"``; also ``python -m pgprune.cli``).

Subcommands:

* ``pgprune prune --model M --sparsity S --out DIR``: load a model (hub id, folder or ``embedded:smollm2-135m``),
  build calibration blocks, compute the scorers the method needs, run the method (the policy-gradient search by
  default; any baseline of :mod:`pgprune.methods`), save the smaller model with its tokenizer, ``masks.json`` and a
  model card, print a summary. The settings are the pipeline's params schema (``--config params.yaml``), which the
  options override; the library calls are the stages' (:mod:`pgprune.api`, :mod:`pgprune.pruning.run`).
  Search checkpoints go to ``--checkpoint-dir`` (default ``<out>.checkpoints``): the same command resumes a killed
  run (SIGINT/SIGTERM write a checkpoint of the last finished step).
* ``pgprune eval DIR``: perplexity on named corpora or text files, lm-eval tasks by name.
* ``pgprune run [stage ...]``: the DVC pipeline of the checkout (``dvc repro``).
* ``pgprune plan``: the memory a search needs per placement, from the model's config alone.
* ``pgprune --version``.

Bad input exits with status 2 and one line naming the value and what is allowed (no traceback). Only light
modules are imported here; torch, transformers and the extras are imported when a subcommand runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from pgprune import __version__
from pgprune.hf.embedded import embedded_cache, model_folder  # noqa: F401  (pgprune.cli.model_folder)
from pgprune.options import GGUF_TYPES
from pgprune.errors import ConfigError, MissingFileError, PgpruneError

log = logging.getLogger("pgprune")

DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS = ("heterogeneous", "uniform")
# Python package -> the pgprune extra that installs it
EXTRA_OF = {"datasets": "eval", "lm_eval": "eval", "accelerate": "scale", "gguf": "embedded",
            "sentencepiece": "embedded", "dvc": "pipeline", "matplotlib": "report", "peft": "recover",
            "llama_cpp": "serve"}


class UsageError(Exception):
    """Bad command-line usage (argparse): reported like a PgpruneError, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: "pgprune prune: error: ... (see --help)"
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


# --- helpers ---------------------------------------------------------------------------------------------------
def _one_line(msg) -> str:
    """A (possibly multi-line) message as one line: "head: item; item"."""
    lines = [x.strip() for x in str(msg).splitlines() if x.strip()]
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "") if lines else ""


def _name_options(msg: str, command: str) -> str:
    """``msg`` with each params key that an option of ``command`` sets followed by that option (the table of
    :mod:`pgprune.options`)."""
    from pgprune.options import flag_of

    for key, opt in flag_of(command).items():
        msg = msg.replace(f"{key}:", f"{key} ({opt}):")
    return msg


def _params(a, command: str, search: bool = True):
    """The params of ``command``: --config (or the defaults, params.yaml's values) with the options of the table
    of :mod:`pgprune.options` given on the command line; errors name the key and its option."""
    from pgprune.api import build_params
    from pgprune.options import overrides

    try:
        return build_params(a.config, overrides(command, vars(a), search=search, cli=True), _where(a))
    except ConfigError as e:
        raise ConfigError(_name_options(str(e), command)) from None


def default_device() -> str:
    """cuda when a CUDA device is visible, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _setup_logging(quiet: bool) -> None:
    if quiet:  # read by tqdm when it is first imported (the library's and transformers' progress bars)
        os.environ["TQDM_DISABLE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pgprune: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _where(a) -> str:
    return f"{a.config} with the command-line options" if a.config else "the command-line options"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def check_architecture(source: str, round_to: int | None = None) -> None:
    """Fail before loading weights when the model's family is not supported or ``round_to`` does not divide its MLP
    width (reads the config only)."""
    from transformers import AutoConfig

    from pgprune.core.adapters import adapter_class

    p = Path(source)
    if p.exists() and not p.is_dir():
        raise MissingFileError(f"--model {source!r} is a file; give a model folder (with config.json), a hub id or "
                               "embedded:smollm2-135m")
    if p.is_dir() and not (p / "config.json").exists():
        raise MissingFileError(f"--model {source!r} is a folder without config.json; give a model folder, a hub id "
                               "or embedded:smollm2-135m")
    if not p.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise MissingFileError(f"--model {source!r}: no such folder, and it is not a hub id (org/name); give a model "
                               "folder, a hub id or embedded:smollm2-135m")
    try:
        cfg = AutoConfig.from_pretrained(source, trust_remote_code=True)
    except (OSError, ValueError) as e:
        reason = _one_line(e).rstrip(".")
        raise PgpruneError(f"could not read the config of --model {source!r}: {reason}. Offline, a hub id works only "
                           "when it is in the Hugging Face cache") from None
    adapter_class(cfg)
    width = getattr(cfg, "intermediate_size", None)
    if round_to and isinstance(width, int) and width % round_to:
        divisors = [d for d in (8, 16, 32, 64, 128, 256) if width % d == 0]
        raise ConfigError(f"--round-to {round_to} does not divide the MLP width {width} of {source!r}; allowed: "
                          f"divisors of {width}, e.g. {divisors or [1]}")


def _check_out(out: Path, model_src: str) -> None:
    """--out is replaced atomically: only a new or empty folder, or an earlier `pgprune prune` output (never the
    input model or any other folder)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder to create (or a model folder to replace)")
    if out.is_dir() and any(out.iterdir()) and not ((out / "config.json").exists() and (out / "masks.json").exists()):
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder written by `pgprune prune` (config.json + "
                          "masks.json); refusing to replace it: give a new folder")
    if Path(model_src).exists() and out.resolve() == Path(model_src).resolve():
        raise ConfigError(f"--out {str(out)!r} is the input model's folder; give another folder")


def _check_calibration(source: str | None) -> None:
    """Fail before loading the model when --calibration names neither a corpus nor an existing file."""
    from pgprune.data.sources import CALIBRATION_SOURCES, is_text_file_name

    if source is None or source in CALIBRATION_SOURCES or Path(source).is_file():
        return
    if is_text_file_name(source):
        raise MissingFileError(f"--calibration file {source!r} not found")
    raise ConfigError(f"--calibration {source!r} is neither a corpus nor a file; allowed: "
                      f"{', '.join(CALIBRATION_SOURCES)} or the path of a .txt/.jsonl file")


def _check_eval_sources(names: list[str] | None, option: str) -> None:
    """Fail early when a perplexity corpus is neither a named corpus nor an existing text file."""
    from pgprune.data.sources import EVAL_SOURCES

    for name in names or []:
        if name in EVAL_SOURCES or Path(name).is_file():
            continue
        if Path(name).suffix:
            raise MissingFileError(f"{option} file {name!r} not found")
        raise ConfigError(f"{option} {name!r} is neither a corpus nor a file; allowed: {', '.join(EVAL_SOURCES)} or "
                          "the path of a .txt/.jsonl file")


def _missing_extra(e: ModuleNotFoundError) -> str:
    top = (e.name or "").split(".")[0]
    extra = EXTRA_OF.get(top)
    hint = f"pip install 'pgprune[{extra}]'" if extra else f"pip install {top}"
    return f"this needs the Python package {top!r}, which is not installed: {hint} (scripts/setup.sh installs all)"


# --- prune -----------------------------------------------------------------------------------------------------
def _perplexities(names, tok, params, model, pruned, progress: bool) -> dict:
    from pgprune.data.sources import eval_blocks
    from pgprune.eval import perplexity

    ev: dict = {"ppl": {}, "dense": {"ppl": {}}}
    for name in names:
        blocks, desc = eval_blocks(name, tok, params)
        key = Path(name).name if Path(name).is_file() else name
        log.info("perplexity on %s: %d blocks of %d tokens", desc, blocks.shape[0], blocks.shape[1])
        bs = params.eval.ppl_batch_size
        ev["ppl"][key] = perplexity(pruned, blocks, batch_size=bs, progress=progress)["ppl"]
        ev["dense"]["ppl"][key] = perplexity(model, blocks, batch_size=bs, progress=progress)["ppl"]
    return ev


def cmd_prune(a, argv: list[str]) -> int:
    import signal

    from pgprune.api import check_sparsity, resolve_method, run_prune
    from pgprune.methods import get_method

    t_start = time.perf_counter()
    params = _params(a, "prune", search=get_method(a.method).kind == "search")
    sparsity = check_sparsity(a.sparsity)
    method, kind, _ = resolve_method(a.method, a.layout, a.round_to)
    source = params.model.source
    out = Path(a.out)
    _check_out(out, source)
    src = model_folder(source)
    check_architecture(src, a.round_to)
    _check_calibration(a.calibration)
    _check_eval_sources(a.eval_ppl, "--eval-ppl")
    searching = get_method(method).kind == "search"
    if a.recover_steps is not None:  # bad recovery settings fail before the pruning, not after it
        from pgprune.recovery.settings import RecoverSettings

        RecoverSettings.parse(_params(a, "prune").recover.settings().model_dump(), steps=a.recover_steps,
                              loss=a.recover_loss)
    ckpt = Path(a.checkpoint_dir) if a.checkpoint_dir else Path(str(out).rstrip("/\\") + ".checkpoints")
    made_ckpt = False
    if searching or a.recover_steps:
        made_ckpt = not ckpt.exists()
        ckpt.mkdir(parents=True, exist_ok=True)
        log.info("search checkpoints: %s (the same command resumes an interrupted run)", ckpt)

    try:
        from pgprune.api import calibration_from
        from pgprune.hf.loading import load_model

        m = params.model
        model, tok = load_model(src, m.dtype, m.device, offload=m.offload, device_map=m.device_map,
                                max_memory=m.max_memory)
        calib, calib_desc = calibration_from(a.calibration, tok, params)
        log.info("calibration: %s", calib_desc)

        def on_term(signum, frame):  # a checkpoint of the last finished step is written on the way out
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGTERM, on_term)
        try:
            result = run_prune(model, tok, params, method=method, sparsity=sparsity, calib=calib,
                               calibration=calib_desc, layout=a.layout, round_to=a.round_to,
                               checkpoint_dir=ckpt if searching else None, progress=not a.quiet, base_model=source,
                               compensation=a.compensation)
        except KeyboardInterrupt:
            if searching:  # main() prints it, once: "pgprune: interrupted; <this>"
                raise KeyboardInterrupt(f"the search checkpoint in {ckpt} lets the same command resume") from None
            raise
        finally:
            signal.signal(signal.SIGTERM, old)
        recovered = None
        if a.recover_steps:
            from pgprune.api import recover

            t0 = time.perf_counter()  # the model being pruned is the kd teacher, already in memory
            recovered = recover(result, data=a.calibration, teacher=model, config=params, inplace=True,
                                checkpoint_dir=ckpt, progress=not a.quiet, steps=a.recover_steps,
                                loss=a.recover_loss)
            result.info["time_s"]["recovery"] = time.perf_counter() - t0
            losses = recovered.info["losses"]
            result.info["recovery"] = {"steps": recovered.info["steps"], "loss": recovered.info["settings"]["loss"],
                                       "first_loss": losses[0], "last_loss": losses[-1]}
        evaluation = None
        if a.eval_ppl:
            t0 = time.perf_counter()
            evaluation = _perplexities(a.eval_ppl, tok, params, model, result.model, not a.quiet)
            result.info["time_s"]["evaluation"] = time.perf_counter() - t0
        command = "pgprune " + shlex.join(argv)
        card = {"base_model": source, "command": command, "evaluation": evaluation}
        saver = recovered if recovered is not None else result
        saved = saver.save(out, card=card, save_dtype=a.save_dtype, format=a.format)
        if a.format == "gguf":
            result.info["gguf"] = str(out / "model.gguf")
    finally:
        if (made_ckpt or not a.checkpoint_dir) and ckpt.is_dir() and not any(ckpt.iterdir()):
            ckpt.rmdir()  # nothing to resume (a search deletes its checkpoint when it completes)
    _print_summary(a, result, saved, ckpt, evaluation, time.perf_counter() - t_start)
    return 0


def cmd_recover(a, argv: list[str]) -> int:
    import signal

    from pgprune.recovery.folder import check_model_folder
    from pgprune.recovery.run import recover_folder
    from pgprune.recovery.settings import RecoverSettings, from_cli

    t_start = time.perf_counter()
    params = _params(a, "recover")
    settings = RecoverSettings.parse(params.recover.settings().model_dump(), **from_cli(vars(a)))  # flags win
    folder = check_model_folder(a.model)
    out = Path(a.out)
    if out.resolve() == folder.resolve():
        raise UsageError(f"pgprune recover: error: --out {out} is the input folder; allowed: another folder")
    _check_calibration(a.calibration)
    _check_eval_sources(a.eval_ppl, "--eval-ppl")
    ckpt = Path(a.checkpoint_dir) if a.checkpoint_dir else Path(str(out).rstrip("/\\") + ".checkpoints")
    made = not ckpt.exists()
    ckpt.mkdir(parents=True, exist_ok=True)

    def on_term(signum, frame):  # the loop writes a checkpoint of the last finished step on the way out
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        path, rec = recover_folder(folder, out, params, settings, data=a.calibration, teacher=a.teacher,
                                   eval_ppl=a.eval_ppl, checkpoint_dir=ckpt, progress=not a.quiet)
    except KeyboardInterrupt as e:
        raise KeyboardInterrupt(f"{e}; the same command resumes" if str(e) else "") from None
    finally:
        signal.signal(signal.SIGTERM, old)
        if (made or not a.checkpoint_dir) and ckpt.is_dir() and not any(ckpt.iterdir()):
            ckpt.rmdir()
    info = rec.info
    summary = {"out": str(path), "steps": info["steps"], "loss": settings.loss,
               "first_loss": info["losses"][0], "last_loss": info["losses"][-1], "tokens": info["tokens"],
               "tokens_per_s": info["tokens_per_s"], "resumed_from_step": info["resumed_from_step"],
               "evaluation": info.get("evaluation"), "time_s": time.perf_counter() - t_start}
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"saved {path}: {info['steps']} LoRA steps ({settings.loss} loss {summary['first_loss']:.4f} -> "
              f"{summary['last_loss']:.4f}), {info['tokens']:,} tokens at {info['tokens_per_s'] or 0:.0f} tokens/s")
        for c, (b, af) in (info.get("evaluation") or {}).items():
            print(f"  perplexity {c}: {b:.2f} -> {af:.2f}")
    return 0


_COMPENSATION_WORDS = {"none": "", "bias": ", mean (bias) compensation", "refit": ", kept weights refit"}


def _print_summary(a, result, saved, ckpt: Path, evaluation, elapsed: float) -> None:
    from pgprune.methods import method_label

    info = result.info
    p = info["params"]
    t = info["time_s"]
    trc = saved.plan.trust_remote_code
    load = (f'AutoModelForCausalLM.from_pretrained("{a.out}"{", trust_remote_code=True" if trc else ""})')
    summary = {
        "out": str(a.out), "method": info["method"], "sparsity": info["sparsity"], "layout": saved.plan.layout,
        "architecture": saved.plan.architecture, "trust_remote_code": trc, "params": p,
        "compensated": info["compensated"], "compensation": info["compensation"], "calibration": info["calibration"],
        "resumed_from_step": info["resumed_from_step"], "checkpoint_dir": str(ckpt) if info["search"] else None,
        "search_seed": info.get("search_seed"), "seeds_not_run": info.get("seeds_not_run"),
        "time_s": {"total": elapsed, **{k: v for k, v in t.items() if k not in ("total", "per_scorer")}},
        "evaluation": evaluation, "saved_params": saved.params_after, "gguf": info.get("gguf"),
        "recovery": info.get("recovery"),
    }
    if a.json:
        print(json.dumps(summary, default=str))
        return
    dl, tot = p["decoder_linear"], p["total"]
    rows = [
        ("method", f"{info['method']} ({method_label(info['method'])}), {saved.plan.layout} layout"
                   f"{_COMPENSATION_WORDS[info['compensation']]}"),
        ("sparsity", f"{_pct(info['sparsity'])} requested"
                     + (f"; {info['sparsity_note']}" if info.get("sparsity_note") else "")),
        ("decoder-layer linear", f"{dl['before']:,} -> {dl['after']:,} parameters ({_pct(dl['sparsity'])} removed)"),
        ("all parameters", f"{tot['before']:,} -> {tot['after']:,} ({_pct(tot['sparsity'])} removed; the saved "
                           f"{saved.plan.architecture} has {saved.params_after:,})"),
        ("calibration", info["calibration"]),
        ("time", f"{elapsed:.1f} s (scores {t['scores']:.1f} s, masks {t['masks']:.1f} s"
                 + (f", perplexity {t['evaluation']:.1f} s" if "evaluation" in t else "") + ")"),
    ]
    if info["search"]:
        r = info["resumed_from_step"]
        left = info.get("seeds_not_run")
        seed = f"seed {info.get('search_seed')}" + (f" (the first of search.seeds; {left} not run)" if left else "")
        rows.append(("search", f"{seed}, " + (f"resumed from step {r} (checkpoint in {ckpt})" if r else
                                             "ran from step 0")))
    for name, v in (evaluation or {}).get("ppl", {}).items():
        rows.append((f"perplexity {name}", f"{v:.3f} (dense {evaluation['dense']['ppl'][name]:.3f})"))
    if saved.plan.note:
        rows.append(("note", saved.plan.note))
    if info.get("recovery"):
        rec = info["recovery"]
        rows.append(("recovery", f"{rec['steps']} LoRA steps ({rec['loss']} loss {rec['first_loss']:.4f} -> "
                                 f"{rec['last_loss']:.4f}) in {t['recovery']:.0f} s"))
    rows += [("saved to", f"{a.out} ({saved.plan.architecture}; model card README.md, masks.json"
                          + (", recovery.json" if info.get("recovery") else "") + ")"),
             ("load it", load)]
    if info.get("gguf"):
        rows.append(("llama.cpp", f"{info['gguf']} (GGUF, deci architecture, f16)"))
    width = max(len(k) for k, _ in rows)
    print("pgprune prune: done")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


# --- eval ------------------------------------------------------------------------------------------------------
def load_for_eval(path: str, dtype: str, device: str):
    """(model, tokenizer) of a saved folder (trust_remote_code only when its config maps classes to bundled code:
    ``auto_map``) or a cached hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pgprune.core.weights import normalize_device
    from pgprune.hf.loading import check_model_files, torch_dtype

    dev = normalize_device(device)  # an unknown or absent device fails before loading
    p = Path(path)
    if p.is_dir():
        cfg_file = p / "config.json"
        if not cfg_file.exists():
            raise MissingFileError(f"model folder {path!r} has no config.json; give a folder written by `pgprune "
                                   "prune` (or any transformers checkpoint folder)")
        check_model_files(p)  # a damaged config.json / *.safetensors: one line naming the file
        trc = "auto_map" in json.loads(cfg_file.read_text(encoding="utf-8"))
    elif p.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise MissingFileError(f"model folder {path!r} not found; give a folder written by `pgprune prune` (or any "
                               "transformers checkpoint folder)")
    else:
        trc = False
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trc)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), trust_remote_code=trc)
    except OSError as e:
        raise PgpruneError(f"could not load {path!r}: {_one_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(dev).eval(), tok, trc


def cmd_eval(a, argv: list[str]) -> int:
    tasks = [t.strip() for t in (a.tasks or "").split(",") if t.strip()]
    if not a.ppl and not tasks:
        raise ConfigError("nothing to evaluate; give --ppl (wikitext2, c4, ptb, local, licenses or a text file) "
                          "and/or --tasks (lm-eval task names, comma-separated)")
    params = _params(a, "eval")
    _check_eval_sources(a.ppl, "--ppl")
    if tasks:
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise ModuleNotFoundError("lm_eval is not installed", name="lm_eval")
    model, tok, trc = load_for_eval(model_folder(a.model), params.model.dtype, params.model.device)
    from pgprune.data.sources import eval_blocks
    from pgprune.eval import perplexity
    from pgprune.hf.export import n_params

    res: dict = {"model": a.model, "architecture": type(model).__name__, "params": n_params(model),
                 "trust_remote_code": trc, "ppl": {}, "ppl_blocks": {}, "zero_shot": None}
    t0 = time.perf_counter()
    for name in a.ppl or []:
        blocks, desc = eval_blocks(name, tok, params)
        key = Path(name).name if Path(name).is_file() else name
        r = perplexity(model, blocks, batch_size=params.eval.ppl_batch_size, progress=not a.quiet)
        res["ppl"][key] = r["ppl"]
        res["ppl_blocks"][key] = f"{blocks.shape[0]} blocks of {blocks.shape[1]} tokens"
        res.setdefault("ppl_source", {})[key] = desc
    if tasks:
        from pgprune.eval import zero_shot

        z = zero_shot(model, tok, tasks, include_path=a.include, batch_size=params.eval.zero_shot_batch_size,
                      limit=a.limit, device=None, metric=params.eval.zero_shot_metric)
        res["zero_shot"] = {"average": z["average"], "metric": z["metric"],
                            "tasks": {k: v.get(z["metric_used"][k]) for k, v in z["tasks"].items()}}
    res["time_s"] = time.perf_counter() - t0
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"{a.model}: {res['architecture']}, {res['params']:,} parameters")
    rows = [(f"perplexity ({k}, {res['ppl_blocks'][k]})", f"{v:.4f}") for k, v in res["ppl"].items()]
    z = res["zero_shot"]
    if z:
        rows += [(f"zero-shot {k} ({z['metric']})", f"{v:.4f}" if v is not None else "n/a")
                 for k, v in z["tasks"].items()]
        rows.append((f"zero-shot average ({z['metric']})", f"{z['average']:.4f}"))
    width = max(len(k) for k, _ in rows)
    vwidth = max(5, *(len(v) for _, v in rows))
    print(f"| {'metric':<{width}} | {'value':>{vwidth}} |\n|{'-' * (width + 2)}|{'-' * (vwidth + 1)}:|")
    for k, v in rows:
        print(f"| {k:<{width}} | {v:>{vwidth}} |")
    return 0


# --- run -------------------------------------------------------------------------------------------------------
def dvc_command() -> list[str] | None:
    """How to run dvc: this interpreter's module when installed, else a `dvc` on PATH, else None."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("dvc") is not None:
        return [sys.executable, "-m", "dvc"]
    exe = shutil.which("dvc")
    return [exe] if exe else None


def cmd_run(a, argv: list[str]) -> int:
    import subprocess

    from pgprune.cli import find_checkout

    root = find_checkout()
    if root is None:
        raise ConfigError(f"not in a pgprune checkout: no dvc.yaml + params.yaml + stages/ in {Path.cwd()} or above; "
                          "`pgprune run` runs the DVC pipeline of a clone of the pgprune repository (use `pgprune "
                          "prune` to prune one model)")
    dvc = dvc_command()
    if dvc is None:
        raise ConfigError("dvc is not installed; `pgprune run` needs the pipeline extra: pip install "
                          "'pgprune[pipeline]' (scripts/setup.sh installs all)")
    args = ["repro", *(["--force"] if a.force else []), *(["--dry"] if a.dry else []), *a.stages]
    print(f"pgprune run: {shlex.join(['dvc', *args])} (in {root})", file=sys.stderr)
    cmd = [*dvc, *args]
    # the stages run `python -m stages.x`: this interpreter's environment must come first on PATH, or a fresh clone's
    # stages would run the system python (no torch) when the venv is not activated
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    return subprocess.call(cmd, cwd=root, env=env)


# --- plan ------------------------------------------------------------------------------------------------------
def cmd_plan(a, argv: list[str]) -> int:
    params = _params(a, "plan")
    from pgprune.hf.memory import format_plan, plan

    src = params.model.source  # the config only: embedded:... is read from its GGUF header, not converted
    p = params.search
    device = a.device or (params.model.device if a.config else default_device())
    d = plan(src, params.model.dtype, offload=params.model.offload, device_map=params.model.device_map,
             batch=p.batch_size, seq_len=params.data.seq_len, samples=p.samples, sample_mode=p.sample_mode,
             device=device, gpus=a.devices, gpu_memory=a.gpu_memory)
    if a.json:
        print(json.dumps(d, default=str))
    else:
        print(format_plan(d))
    return 0


# --- gguf ------------------------------------------------------------------------------------------------------
def cmd_export(a, argv: list[str]) -> int:
    """`pgprune export FOLDER --format gguf --out x.gguf`: a saved folder as one llama.cpp file (deci);
    `--format vllm --out DIR`: as a vLLM DeciLMForCausalLM folder."""
    folder = Path(a.model)
    if not folder.is_dir():
        raise ConfigError(f"{a.model!r}: not a folder; allowed: a folder saved by `pgprune prune` or "
                          "`pgprune recover`")
    for name in ("config.json", "masks.json"):
        if not (folder / name).is_file():
            raise ConfigError(f"{a.model!r} has no {name}; allowed: a folder saved by `pgprune prune` (or "
                              "`pgprune recover`, or the pipeline's models/pruned)")
    out = Path(a.out)
    if a.format == "vllm":
        return _export_vllm(a, folder, out)
    from pgprune.hf.gguf import save_gguf

    if out.is_dir():
        raise ConfigError(f"--out {a.out!r} is a folder; allowed: the path of the .gguf file to write")
    a.type = a.type or "f16"
    model, _, _ = load_for_eval(str(folder), "float32", "cpu")
    info = save_gguf(model, out, folder, dtype=GGUF_TYPES[a.type], tokenizer_pre=a.tokenizer_pre)
    heads = [s["heads"] for s in info["layers"]]
    ff = [s["ff"] for s in info["layers"]]
    if a.json:
        print(json.dumps(info))
    else:
        print(f"saved {info['path']}: llama.cpp architecture {info['architecture']}, {len(heads)} layers, "
              f"{info['tensors']} tensors, {a.type}; query heads per layer {min(heads)}-{max(heads)}, "
              f"MLP channels per layer {min(ff)}-{max(ff)}")
        for note in info.get("notes") or ():
            print(f"  {note}")
    return 0


def _export_vllm(a, folder: Path, out: Path) -> int:
    from pgprune.hf.vllm import save_vllm

    for flag, value in (("--type", a.type), ("--tokenizer-pre", a.tokenizer_pre)):
        if value is not None:
            raise ConfigError(f"{flag} is for --format gguf; allowed with --format vllm: --out and --json")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {a.out!r} is a file; allowed: the folder to write")
    if out.resolve() == folder.resolve():
        raise ConfigError(f"--out {a.out!r} is the input folder; allowed: another folder")
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")  # the folder's own: the same bytes out
    model, _, _ = load_for_eval(str(folder), dtype, "cpu")
    info = save_vllm(model, out, folder)
    if a.json:
        print(json.dumps(info))
    else:
        kv = [x["kv_heads"] for x in info["layers"]]
        ff = [x["ff"] for x in info["layers"]]
        print(f"saved {info['path']}: vLLM architecture {info['architecture']}, {len(kv)} layers, "
              f"{info['query_heads']} query heads per layer (zero-padded), KV heads per layer {min(kv)}-{max(kv)}, "
              f"MLP channels per layer {min(ff)}-{max(ff)}; load with trust_remote_code=True")
        for note in info.get("notes") or ():
            print(f"  {note}")
    return 0


# --- parser ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from pgprune.config import EvalParams
    from pgprune.methods import METHODS

    ap = _Parser(prog="pgprune", description="Policy-gradient structural pruning of LLaMA-family LLMs.")
    ap.add_argument("--version", action="version", version=f"pgprune {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="{prune,recover,eval,export,run,plan}", parser_class=_Parser)

    pr = sub.add_parser("prune", help="prune a model and save it (one command; no pipeline)",
                        description="Prune a model (hub id, folder or embedded:smollm2-135m) and save a "
                                    "self-contained folder: weights, config, tokenizer, masks.json, model card.")
    pr.add_argument("--model", help="hub id, local folder or embedded:smollm2-135m (default: the config's "
                                    "model.source, embedded:smollm2-135m)")
    pr.add_argument("--sparsity", type=float, required=True,
                    help="fraction of decoder-layer linear parameters removed, 0 < S < 1")
    pr.add_argument("--out", required=True, help="folder to write the pruned model to")
    pr.add_argument("--method", default="pg", help=f"pruning method (default pg); allowed: {', '.join(METHODS)}")
    pr.add_argument("--layout", choices=LAYOUTS,
                    help="heterogeneous: per-layer widths (loads with trust_remote_code=True); uniform: the same "
                         "widths in every layer, saved as the stock architecture (default: the method's own; "
                         "saved uniform whenever the widths allow)")
    pr.add_argument("--round-to", type=int, metavar="N", help="keep MLP channels in multiples of N (search: "
                    "search.channel_group; a baseline: the uniform layout)")
    pr.add_argument("--calibration", metavar="SOURCE", help="wikitext2 | c4 | ptb | local | a .txt/.jsonl file "
                    "(default: the config's data.calibration, local)")
    pr.add_argument("--nsamples", type=int, metavar="N", help="calibration blocks the metrics use (init.nsamples)")
    pr.add_argument("--calib-blocks", type=int, metavar="N", help="calibration blocks drawn (data.calib_blocks; the "
                    "search trains on them, less search.val_blocks held back)")
    pr.add_argument("--seq-len", type=int, metavar="N", help="tokens per calibration block (data.seq_len)")
    pr.add_argument("--steps", type=int, metavar="N",
                    help="search steps (search.steps, default 100); longer searches can gain at high sparsity but "
                         "not reliably: docs/defaults.md")
    pr.add_argument("--seed", type=int, help="seed of the search, the calibration windows and the random scorer")
    pr.add_argument("--device", help="cpu, cuda, cuda:N or mps (model.device)")
    pr.add_argument("--dtype", choices=DTYPES, help="dtype the model is loaded and pruned in (model.dtype)")
    pr.add_argument("--save-dtype", choices=DTYPES, help="dtype of the saved weights (default: --dtype)")
    pr.add_argument("--threads", type=int, help="torch CPU threads (model.threads)")
    pr.add_argument("--offload", choices=("none", "cpu", "disk"), help="model.offload: keep the decoder layers in "
                    "CPU memory or on disk, one at a time on the device")
    pr.add_argument("--device-map", choices=("none", "auto"), help="model.device_map: auto spreads the layers over "
                    "the visible GPUs (accelerate)")
    pr.add_argument("--config", metavar="PARAMS_YAML", help="settings in the pipeline's params.yaml schema; the "
                    "options above override them")
    pr.add_argument("--compensation", choices=("none", "bias", "refit"),
                    help="what the kept weights get: none; bias (the removed units' calibration means, FLAP's); "
                         "refit (least-squares refit of the kept o_proj/down_proj columns, section refit). Default: "
                         "a baseline's own (flap: bias, <metric>_refit: refit), search.compensation (refit) for pg")
    pr.add_argument("--eval-ppl", nargs="+", metavar="CORPUS", help="also measure the perplexity of the pruned and "
                    "the dense model (wikitext2 | c4 | ptb | local | licenses | a text file; "
                    "eval.ppl_seq_len/ppl_blocks of --config); goes into the card")
    pr.add_argument("--checkpoint-dir", help="search checkpoints (default: <out>.checkpoints; removed when done)")
    pr.add_argument("--format", choices=("hf", "gguf"), default="hf", help="hf: the transformers folder (default); "
                    "gguf: the folder and <out>/model.gguf for llama.cpp (f16, as `pgprune export --format gguf`)")
    pr.add_argument("--recover-steps", type=int, metavar="N", help="then recover the pruned model with N LoRA steps "
                    "(`pgprune recover`'s defaults otherwise; needs the recover extra); the card records it")
    pr.add_argument("--recover-loss", choices=("lm", "kd"), help="loss of --recover-steps (default kd: distillation "
                    "from the model being pruned)")
    pr.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    pr.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    pr.set_defaults(func=cmd_prune)

    rc = sub.add_parser("recover", help="recover a pruned model with a short LoRA tune (distillation or LM loss)",
                        description="Train LoRA adapters (peft) on a folder saved by `pgprune prune`, merge them "
                                    "into the weights and save the model in the same layout, with a Recovery section "
                                    "in its card. Needs the recover extra.")
    rc.add_argument("model", metavar="DIR", help="a model folder saved by `pgprune prune`")
    rc.add_argument("--out", required=True, help="folder to write the recovered model to")
    rc.add_argument("--calibration", metavar="SOURCE", help="training text: wikitext2 | c4 | ptb (train split) | "
                    "local (its calibration documents) | a .txt/.jsonl file (default: the config's data.calibration)")
    rc.add_argument("--teacher", metavar="SOURCE", help="the dense model for --loss kd (default: the base model the "
                    "folder's card records)")
    rc.add_argument("--eval-ppl", nargs="+", metavar="CORPUS", help="measure the perplexity before and after "
                    "(local | licenses | wikitext2 | c4 | ptb | a text file); goes into the card")
    rc.add_argument("--blocks", type=int, help="perplexity blocks per corpus of --eval-ppl (eval.ppl_blocks)")
    rc.add_argument("--device", help="cpu, cuda, cuda:N or mps (model.device)")
    rc.add_argument("--dtype", choices=DTYPES, help="dtype the model is loaded and trained in (model.dtype)")
    rc.add_argument("--offload", choices=("none", "cpu", "disk"), help="the teacher's placement (model.offload): "
                    "cpu/disk stream its layers one at a time")
    rc.add_argument("--config", metavar="PARAMS_YAML", help="settings in the params.yaml schema (data.* for the "
                    "corpora, model.*, eval.*)")
    rc.add_argument("--checkpoint-dir", help="recovery checkpoints (default: <out>.checkpoints; removed when done)")
    rc.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    rc.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    from pgprune.recovery.settings import cli_flags

    for flag, kw in cli_flags():
        rc.add_argument(flag, **kw)
    rc.set_defaults(func=cmd_recover)

    ev = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a saved model",
                        description="Evaluate a model folder: perplexity on named corpora or text files, lm-eval "
                                    "tasks by name.")
    ev.add_argument("model", metavar="DIR", help="model folder (written by `pgprune prune`, or any checkpoint), a "
                    "hub id or embedded:smollm2-135m")
    ev.add_argument("--ppl", nargs="+", metavar="CORPUS",
                    help="wikitext2 | c4 | ptb (test split; needs the eval extra) | local | licenses | a text file")
    ev.add_argument("--tasks", help="lm-eval task names, comma-separated (e.g. arc_easy,piqa; needs the eval extra)")
    ev.add_argument("--include", metavar="DIR", help="a folder of extra lm-eval task yamls (lm-eval's include_path, "
                    "e.g. the pipeline's data/tasks)")
    ev.add_argument("--limit", type=int, help="examples per zero-shot task")
    ev.add_argument("--seq-len", type=int, help="tokens per perplexity block (eval.ppl_seq_len, default "
                    f"{EvalParams().ppl_seq_len})")
    ev.add_argument("--blocks", type=int, help="perplexity blocks per corpus (eval.ppl_blocks, default "
                    f"{EvalParams().ppl_blocks})")
    ev.add_argument("--batch-size", type=int, help="perplexity batch size (eval.ppl_batch_size)")
    ev.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (model.device, default cpu)")
    ev.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype the model is loaded and evaluated in "
                    "(model.dtype, default float32)")
    ev.add_argument("--config", metavar="PARAMS_YAML", help="settings (data.data_files for offline corpora, eval.*)")
    ev.add_argument("--json", action="store_true", help="print the results as one JSON line")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    ev.set_defaults(func=cmd_eval)

    rn = sub.add_parser("run", help="run the DVC pipeline of this checkout (dvc repro)",
                        description="Run the pipeline of the pgprune checkout holding the current folder (`dvc "
                                    "repro`; needs the pipeline extra).")
    rn.add_argument("stages", nargs="*", help="stages to reproduce (default: all), e.g. search export")
    rn.add_argument("--force", action="store_true", help="rerun even when nothing changed (dvc repro --force)")
    rn.add_argument("--dry", action="store_true", help="only print what would run (dvc repro --dry)")
    rn.set_defaults(func=cmd_run, quiet=False)

    pl = sub.add_parser("plan", help="memory a search needs, from the config alone (no weights are loaded)",
                        description="Estimate the device and host memory of a search for each placement.")
    pl.add_argument("--model", help="hub id, folder or embedded:smollm2-135m (default: the config's model.source)")
    pl.add_argument("--config", metavar="PARAMS_YAML", help="settings in the pipeline's params.yaml schema (model.*, "
                    "search.*, data.seq_len); the options here override them")
    pl.add_argument("--dtype", choices=DTYPES, help="dtype of the weights (model.dtype)")
    pl.add_argument("--offload", choices=("none", "cpu", "disk"), help="the placement marked selected "
                    "(model.offload)")
    pl.add_argument("--device-map", choices=("none", "auto"), help="auto marks the device_map row selected "
                    "(model.device_map)")
    pl.add_argument("--batch", type=int, help="calibration blocks per search step (search.batch_size)")
    pl.add_argument("--seq-len", type=int, help="tokens per block (data.seq_len)")
    pl.add_argument("--samples", type=int, help="masks sampled per step (search.samples)")
    pl.add_argument("--sample-mode", choices=("auto", "batched", "separate"), help="batched: one forward for all "
                    "sampled masks; separate: one per mask (search.sample_mode)")
    pl.add_argument("--device", help="compute device (model.device; default: the config's, else cuda when a CUDA "
                    "device is visible, else cpu)")
    pl.add_argument("--devices", type=int, default=1, metavar="N", help="GPUs for the device_map row")
    pl.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GiB (marks which placements fit)")
    pl.add_argument("--json", action="store_true", help="print the plan as one JSON line")
    pl.set_defaults(func=cmd_plan, quiet=False)

    ex = sub.add_parser("export", help="write a saved pruned model for another engine (llama.cpp: --format gguf; "
                        "vLLM: --format vllm)",
                        description="Convert a folder saved by `pgprune prune` (either layout) into one GGUF file "
                                    "that llama.cpp loads as its deci architecture (per-layer head counts and FFN "
                                    "widths, compensation biases, the tokenizer and the card's metadata), or into a "
                                    "DeciLMForCausalLM folder for vLLM (per-layer KV heads and exact MLP widths, "
                                    "query heads zero-padded to the global count).")
    ex.add_argument("model", metavar="FOLDER", help="a folder saved by `pgprune prune` (or models/pruned)")
    ex.add_argument("--format", choices=("gguf", "vllm"), default="gguf", help="gguf: llama.cpp (default); vllm: "
                    "a vLLM DeciLMForCausalLM folder")
    ex.add_argument("--out", required=True, help="the .gguf file (gguf) or the folder (vllm) to write")
    ex.add_argument("--type", choices=tuple(GGUF_TYPES), default=None,
                    help="gguf: type of the weight matrices (default f16; q8_0 for rows that are multiples of 32, "
                         "else f16; norms and biases stay f32)")
    ex.add_argument("--tokenizer-pre", help="llama.cpp's pre-tokenizer name, e.g. smollm (SmolLM2), llama-bpe "
                    "(Llama 3); default: llama.cpp's default regex")
    ex.add_argument("--json", action="store_true", help="print what was written as one JSON line")
    ex.set_defaults(func=cmd_export, quiet=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        a = parser.parse_args(argv)
        if a.command is None:
            parser.print_help()
            return 2
        _setup_logging(getattr(a, "quiet", False))
        return int(a.func(a, argv) or 0)
    except UsageError as e:
        print(f"{e}", file=sys.stderr)
        return 2
    except PgpruneError as e:
        print(f"pgprune: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        print(f"pgprune: error: {_missing_extra(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("pgprune: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


def find_checkout(start: str | Path | None = None) -> Path | None:
    """The pgprune checkout (a folder with dvc.yaml, params.yaml and stages/) holding ``start`` (default: the
    current folder), or None."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file() and (d / "params.yaml").is_file() and (d / "stages").is_dir():
            return d
    return None
