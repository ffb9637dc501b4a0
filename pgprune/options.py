"""The one table of options that set params keys: the flags of `pgprune prune`, `eval` and `plan` and the keyword
arguments of :func:`pgprune.prune`. Both turn the values given into params overrides here (:func:`overrides`);
tests/test_options.py checks the table against the params schema, the CLI parser and prune()'s signature.

Light: no torch, no pydantic (the command line imports it before any subcommand runs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

COMMANDS = ("prune", "eval", "plan", "recover")
# `pgprune export --type` / save(gguf_type=...) -> pgprune.hf.gguf.save_gguf's dtype of the weight matrices
GGUF_TYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "q8_0": "q8_0"}


def _same(v: Any, n: int) -> tuple:
    return (v,) * n


def _seed(v: Any, n: int) -> tuple:  # search.seeds takes a list: one search with this seed
    return ([int(v)], int(v), int(v))


def _flag(v: Any, n: int) -> tuple:
    return (bool(v),) * n


def _corpus(v: Any, n: int) -> tuple | None:  # a corpus name sets data.calibration; a file or a text does not
    from pgprune.data.sources import CALIBRATION_SOURCES

    return (v,) if isinstance(v, str) and v in CALIBRATION_SOURCES else None


@dataclass(frozen=True)
class Option:
    """One option of ``command``: its prune() keyword / argparse dest ``name``, its CLI ``flag`` (None: API only),
    whether prune() takes it (``api``), the params ``keys`` it sets and how a value becomes theirs (``spread``:
    (value, len(keys)) -> one value per key, or None to set nothing). ``cli_dest``/``from_cli``: an argparse dest
    and conversion that differ from the keyword; ``search_only``: set only for search methods (a baseline gets
    ``compensation`` as run_prune's argument, not as search.compensation)."""

    command: str
    name: str
    keys: tuple[str, ...]
    flag: str | None = ""
    api: bool = False
    search_only: bool = False
    spread: Callable[[Any, int], tuple | None] = _same
    cli_dest: str | None = None
    from_cli: Callable[[Any], Any] | None = None

    @property
    def cli_flag(self) -> str | None:
        return ("--" + self.name.replace("_", "-")) if self.flag == "" else self.flag

    @property
    def dest(self) -> str:
        return self.cli_dest or self.name


def _opt(command: str, name: str, *keys: str, **kw) -> Option:
    return Option(command, name, tuple(keys), **kw)


OPTIONS: tuple[Option, ...] = (
    # pgprune prune and pgprune.prune()
    _opt("prune", "model", "model.source"),  # prune() takes a loaded model, not a source
    _opt("prune", "calibration", "data.calibration", api=True, spread=_corpus),
    _opt("prune", "nsamples", "init.nsamples", api=True),
    _opt("prune", "calib_blocks", "data.calib_blocks", api=True),
    _opt("prune", "seq_len", "data.seq_len", api=True),
    _opt("prune", "steps", "search.steps", api=True),
    _opt("prune", "seed", "search.seeds", "data.seed", "init.seed", api=True, spread=_seed),
    _opt("prune", "round_to", "search.channel_group", api=True, search_only=True),
    _opt("prune", "compensation", "search.compensation", api=True, search_only=True),
    _opt("prune", "device", "model.device", api=True),
    _opt("prune", "dtype", "model.dtype"),
    _opt("prune", "threads", "model.threads"),
    _opt("prune", "offload", "model.offload"),
    _opt("prune", "device_map", "model.device_map"),
    # pgprune eval
    _opt("eval", "seq_len", "eval.ppl_seq_len"),
    _opt("eval", "blocks", "eval.ppl_blocks"),
    _opt("eval", "batch_size", "eval.ppl_batch_size"),
    _opt("eval", "limit", "eval.zero_shot_limit"),
    _opt("eval", "device", "model.device"),
    _opt("eval", "dtype", "model.dtype"),
    # pgprune plan
    _opt("plan", "model", "model.source"),
    _opt("plan", "dtype", "model.dtype"),
    _opt("plan", "offload", "model.offload"),
    _opt("plan", "device_map", "model.device_map"),
    _opt("plan", "device", "model.device"),
    _opt("plan", "batch", "search.batch_size"),
    _opt("plan", "seq_len", "data.seq_len"),
    _opt("plan", "samples", "search.samples"),
    _opt("plan", "sample_mode", "search.sample_mode"),
    # pgprune recover (the LoRA settings are pgprune.recovery.settings.RecoverSettings's own flags)
    _opt("recover", "device", "model.device"),
    _opt("recover", "dtype", "model.dtype"),
    _opt("recover", "offload", "model.offload"),
    _opt("recover", "blocks", "eval.ppl_blocks"),
)

# options of the commands that set no params key (the parser's other flags), with what they are
NOT_PARAMS: dict[str, dict[str, str]] = {
    "prune": {"--sparsity": "the run's sparsity", "--out": "output folder", "--method": "method registry",
              "--layout": "mask/export layout", "--config": "params file", "--save-dtype": "saved weights' dtype",
              "--eval-ppl": "corpora measured after", "--checkpoint-dir": "checkpoint folder",
              "--json": "output format", "--quiet": "logging", "--recover-steps": "recovery steps after pruning", "--format": "output format",
              "--recover-loss": "recovery loss after pruning"},
    "eval": {"model": "model folder", "--ppl": "corpora measured", "--tasks": "lm-eval tasks",
             "--include": "lm-eval include path", "--config": "params file", "--json": "output format",
             "--quiet": "logging"},
    "plan": {"--config": "params file", "--devices": "GPU count of the device_map row",
             "--gpu-memory": "memory per GPU", "--json": "output format"},
    "recover": {"model": "model folder", "--out": "output folder", "--calibration": "training text",
                "--teacher": "kd teacher", "--eval-ppl": "corpora measured before and after",
                "--config": "params file", "--checkpoint-dir": "checkpoint folder", "--json": "output format",
                "--quiet": "logging"},  # + the flags pgprune.recovery.settings.cli_flags() generates
}


def options(command: str) -> tuple[Option, ...]:
    """The table's options of ``command`` (prune, eval, plan, recover)."""
    if command not in COMMANDS:
        raise ValueError(f"command={command!r}; allowed: {', '.join(COMMANDS)}")
    return tuple(o for o in OPTIONS if o.command == command)


def api_options() -> tuple[Option, ...]:
    """The options pgprune.prune() takes as keyword arguments."""
    return tuple(o for o in options("prune") if o.api)


def overrides(command: str, values: Mapping[str, Any], *, search: bool = True, cli: bool = False
              ) -> dict[str, Any]:
    """Params overrides {key: value} of the options given in ``values`` (option name -> value, or with ``cli`` an
    argparse namespace's vars: dest -> value); None (not given) sets nothing; ``search``: the method searches."""
    out: dict[str, Any] = {}
    for o in options(command):
        if cli:
            if o.cli_flag is None:
                continue
            v = values.get(o.dest)
            if o.from_cli is not None:
                v = o.from_cli(v)
        else:
            if not o.api:
                continue
            v = values.get(o.name)
        if v is None or (o.search_only and not search):
            continue
        spread = o.spread(v, len(o.keys))
        if spread is not None:
            out.update(zip(o.keys, spread))
    return out


def flag_of(command: str) -> dict[str, str]:
    """params key -> the CLI flag of ``command`` that sets it (error messages name both)."""
    return {k: o.cli_flag for o in options(command) if o.cli_flag for k in o.keys}
