"""The one validated schema of params.yaml. Errors name the key, the bad value and what is allowed."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pgprune.errors import ConfigError, format_validation, validation_messages
from pgprune.methods import METHOD_ORDER, METHODS, METRIC_METHODS, SEARCH_METHODS
from pgprune.recovery.settings import RecoverSettings
from pgprune.scorers.registry import SCORER_NAMES
from pgprune.search.settings import SearchSettings

Scorer = Literal[SCORER_NAMES]  # type: ignore[valid-type]  # the scorer registry, pgprune/scorers
MethodName = Literal[METHOD_ORDER]  # type: ignore[valid-type]  # the registry, pgprune/methods.py
SearchMethodName = Literal[SEARCH_METHODS]  # type: ignore[valid-type]
MetricMethodName = Literal[METRIC_METHODS]  # type: ignore[valid-type]
Group = Literal["heads", "channels", "layers"]
TextSource = Literal["local", "licenses", "wikitext2", "c4", "ptb"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelParams(_Strict):
    source: str = Field("embedded:smollm2-135m", description="embedded:smollm2-135m, a local folder or a hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype the model is loaded, "
                                                              "searched and evaluated in (float32 for the default "
                                                              "CPU: bfloat16 matmuls are ~7x slower on CPUs without "
                                                              "bf16 units; bfloat16 on GPUs)")
    device: str = Field("cpu", description="compute device: cpu, cuda, cuda:N, mps")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    offload: Literal["none", "cpu", "disk"] = Field(
        "none", description="none: the whole model on `device`; cpu: weights in CPU memory, one decoder layer at a "
        "time on `device`; disk: weights memory-mapped from the safetensors files, one layer at a time")
    device_map: Literal["none", "auto"] = Field(
        "none", description="auto: place the decoder layers over every visible GPU (and CPU/disk past max_memory), "
        "with accelerate")
    max_memory: dict[str, str] = Field(default_factory=dict, description="device_map auto: memory per device, "
                                       "e.g. {'0': '20GiB', 'cpu': '60GiB'} (accelerate's max_memory)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not (v in ("cpu", "mps", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())):
            raise ValueError(f"device={v!r}; allowed: cpu, cuda, cuda:N, mps")
        return v


class DataParams(_Strict):
    calibration: TextSource = "local"
    evaluation: list[TextSource] = ["local", "licenses"]
    data_files: dict[str, str | list[str]] = Field(default_factory=dict,
                                                   description="local files standing in for a hub dataset")
    local_sources: list[Literal["kjv", "fortunes", "jargon"]] = ["kjv", "fortunes", "jargon"]
    heldout_fraction: float = Field(0.1, gt=0, lt=0.5)
    seq_len: int = Field(128, ge=8, le=32768)
    calib_blocks: int = Field(512, ge=1)
    zero_shot_items: int = Field(200, ge=4)
    seed: int = 0

    @field_validator("evaluation")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("at least one evaluation corpus is needed; allowed: local, licenses, wikitext2, c4, ptb")
        if len(set(v)) != len(v):
            raise ValueError(f"evaluation corpora repeat: {v}")
        return v

    @model_validator(mode="after")
    def _calibration_not_evaluated(self):
        if self.calibration != "local" and self.calibration in self.evaluation:
            pass  # hub corpora use their own splits (train for calibration, test/validation for evaluation)
        if self.calibration == "licenses":
            raise ValueError("data.calibration='licenses' is not allowed: the licences corpus is the out-of-domain "
                             "evaluation text; allowed: local, wikitext2, c4, ptb")
        return self


class InitParams(_Strict):
    nsamples: int = Field(64, ge=1, description="calibration blocks used by the metrics")
    batch_size: int = Field(8, ge=1)
    scorers: list[Scorer] = Field(["magnitude", "wanda_sp", "flap", "random"], description="importance metrics "
                                  "computed (the search's init and the baselines' scores); every scorer: magnitude, "
                                  "wanda_sp, flap, taylor, shortgpt, random (taylor and shortgpt are needed by the "
                                  "taylor and layer_drop baselines, which the default pipeline drops for time)")
    flap_bias_compensation: bool = True
    seed: int = 0


class SearchRule(_Strict):
    """One entry of ``search.at_sparsity``: search settings that replace the section's own at sparsities up to
    ``up_to`` (inclusive) in the listed layouts."""

    up_to: float = Field(gt=0, lt=1, description="the rule applies at sparsities <= this")
    layouts: list[Literal["heterogeneous", "uniform"]] = Field(["heterogeneous", "uniform"], min_length=1)
    set: dict[str, Any] = Field(min_length=1, description="search.* keys and the values they take there")


class SearchParams(SearchSettings):
    """The pipeline's ``search`` section: the search's own settings (pgprune.search.SearchSettings: steps,
    samples, estimator, baseline, lr schedule, penalty, checkpoint_every ...) plus what ties it to a model."""

    granularity: list[Group] = ["heads", "channels"]
    layer_sparsity: float = Field(0.0, ge=0, lt=1, description="fraction of layers dropped when 'layers' is searched")
    init: Scorer = "flap"
    init_map: Literal["sigmap", "norm", "const", "uniform"] = "const"
    init_allocation: Literal["global", "uniform", "slimgpt"] = "slimgpt"
    init_const: float = Field(0.95, gt=0.5, le=1.0, description="keep-probability of the init mask's units with "
                              "init_map: const (1 - init_const for the others)")
    init_free_heads: float = Field(0.5, ge=0, lt=1, description="init_map: const: fraction of the head budget left "
                                   "undecided at the metric's boundary (keep-probability 0.55 just inside, 0.45 just "
                                   "outside), so the search can trade those units; 0 starts every unit decided")
    init_free_channels: float = Field(0.5, ge=0, lt=1, description="the same for MLP channels (channel blocks)")
    init_free_margin: float = Field(0.2, gt=0, lt=0.5, description="undecided units start at 1/2 + margin (kept by "
                                    "the metric) and 1/2 - margin (just outside its cut): small = sampled nearly at "
                                    "random, larger = samples stay close to the metric's mask")
    policy: Literal["units", "widths"] = Field(
        "widths", description="units: an independent keep-probability per unit (the paper's); widths: per layer, a "
        "distribution over how many units it keeps, in the init metric's rank order (prefix sampling, non-increasing "
        "keep-probabilities; needs estimator loo or exact). The uniform layout fixes every layer's width, so "
        "pg_uniform always searches units")
    channel_group: int = Field(64, ge=1, description="MLP channels searched and kept together: each layer's channels "
                               "are ranked by the init metric and cut into blocks of this many (kept widths are "
                               "multiples of it); must divide the intermediate size")
    batch_size: int = Field(4, ge=1, description="calibration blocks per search step")
    lr_heads: float = Field(0.4, gt=0)
    lr_channels: float = Field(0.4, gt=0)
    lr_layers: float = Field(0.02, gt=0)
    min_heads_per_layer: int = Field(1, ge=1, description="KV groups every kept layer keeps (every method)")
    compensation: Literal["none", "bias", "refit"] = Field(
        "refit", description="what the searched masks' kept weights get: none; bias (removed o_proj/down_proj inputs "
        "replaced by their calibration means, FLAP's); refit (least-squares refit of the kept o_proj/down_proj "
        "columns and biases on sequential calibration activations, section refit). bias and refit need the flap "
        "scorer's means: the search's sampled masks are mean-compensated in both; refit is applied to the final masks")
    refit_loss: bool = Field(True, description="with compensation refit: every sampled and validated mask's loss is "
                             "that of the model whose kept o_proj/down_proj weights are refit for it (from Gram "
                             "matrices of the dense model's calibration inputs, cached once; one mask per forward); "
                             "false: the search optimises the mean-compensated loss and only the final masks are refit")
    refit_reference: bool = Field(True, description="with the refit loss and a start mask (init_allocation: slimgpt): "
                                  "its Gram matrices are taken on the calibration stream of the start's pruned, refit "
                                  "model (sequential inputs: the start's refit is exact) instead of the dense model's")
    validate_every: int = Field(10, ge=0, description="steps between hard-mask validations (0: start and end only)")
    val_blocks: int = Field(32, ge=0, description="calibration blocks held back to validate hard masks (0: off)")
    select: Literal["best", "last"] = Field("best", description="final mask: best validated, or the last probs")
    seeds: list[int] = Field([42, 43, 44], min_length=1, description="one search per seed; the first seed's masks "
                             "are the method's result, the others measure the spread (the pipeline runs them all; "
                             "`pgprune prune` and pgprune.prune() run the first)")
    sample_mode: Literal["auto", "batched", "separate"] = Field(
        "auto", description="batched: one forward evaluates all K sampled masks (weights read once per step); "
        "separate: one gathered forward per mask; auto: batched on GPUs, separate on CPU")
    devices: list[str] = Field(default_factory=list, description="split the K samples of a step over these devices "
                               "(data parallel, each holds a replica; only losses are exchanged); empty: model.device")
    at_sparsity: list[SearchRule] = Field(
        default_factory=list, description="settings by sparsity: a list of {up_to, layouts, set}; a search at "
        "sparsity s in a layout takes the `set` values of every rule with s <= up_to that lists its layout (later "
        "rules win); a search.* value given explicitly (CLI option, API argument, build_params override) wins over "
        "the rules. Left out of the params: DEFAULT_SEARCH_RULES (params.yaml's); a SearchParams built alone has "
        "none")

    @model_validator(mode="after")
    def _check(self):
        if not self.granularity:
            raise ValueError("search.granularity is empty; allowed entries: heads, channels, layers")
        if "layers" in self.granularity and self.layer_sparsity == 0 and len(self.granularity) > 1:
            raise ValueError("search.granularity includes 'layers' with heads/channels: set search.layer_sparsity > 0")
        if 0.5 + self.init_free_margin > self.init_const:
            raise ValueError(f"search.init_free_margin={self.init_free_margin} puts undecided units above "
                             f"init_const={self.init_const}; allowed: 1/2 + init_free_margin <= init_const")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"search.seeds repeat: {self.seeds}")
        if self.policy == "widths" and self.estimator not in ("loo", "exact"):
            raise ValueError(f"search.policy 'widths' samples one prefix per layer; search.estimator="
                             f"{self.estimator!r} is not allowed with it; allowed: loo, exact")
        bad = [d for d in self.devices if not (d in ("cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()))]
        if bad:
            raise ValueError(f"search.devices {bad} are not devices; allowed: cpu, cuda, cuda:N")
        # the init metric, its compensation and the seeds are the cell's, not the sparsity's
        allowed = sorted(set(type(self).model_fields) - {"at_sparsity", "seeds", "init", "compensation"})
        for i, rule in enumerate(self.at_sparsity):
            unknown = sorted(set(rule.set) - set(allowed))
            if unknown:
                raise ValueError(f"search.at_sparsity[{i}].set has {unknown}; allowed: "
                                 f"{', '.join(allowed)}")
            try:
                self._merged(rule.set)
            except ValidationError as e:
                raise ValueError(f"search.at_sparsity[{i}] (up_to {rule.up_to}) gives invalid search settings: "
                                 f"{format_validation(e)}") from None
        return self

    def _merged(self, update: dict) -> "SearchParams":
        data = self.model_dump() | dict(update) | {"at_sparsity": []}
        return type(self).model_validate(data)

    def at(self, sparsity: float, layout: str = "heterogeneous") -> "SearchParams":
        """The settings a search at ``sparsity`` in ``layout`` runs with: the section's values, replaced by those of
        every matching ``at_sparsity`` rule in order; the result has no rules left (resolving it again changes
        nothing)."""
        update: dict = {}
        for rule in self.at_sparsity:
            if float(sparsity) <= rule.up_to + 1e-9 and layout in rule.layouts:
                update.update(rule.set)
        if not (update or self.at_sparsity):
            return self
        try:
            return self._merged(update)
        except ValidationError as e:  # each rule is valid alone (checked on load); their combination is not
            raise ConfigError(f"search.at_sparsity at sparsity {sparsity} ({layout}) combines {update} into invalid "
                              f"search settings: {format_validation(e)}") from None

    def without_rules_for(self, keys) -> "SearchParams":
        """A copy whose ``at_sparsity`` rules no longer set ``keys`` (values given explicitly win over the rules);
        a rule left with nothing to set is dropped."""
        keys = set(keys)
        rules = [r.model_copy(update={"set": {k: v for k, v in r.set.items() if k not in keys}})
                 for r in self.at_sparsity]
        return self.model_copy(update={"at_sparsity": [r for r in rules if r.set]})


# the search section's default rules (params.yaml's): none since 2026-12-05 (the start is SlimGPT's masks at every
# sparsity and the widths policy with the refit loss measured better than the units policy's rule up to 30%, which
# only ever returned its start: docs/defaults.md); the mechanism stays for experiments and other settings
DEFAULT_SEARCH_RULES: tuple[dict, ...] = ()


class SpeedParams(_Strict):
    enabled: bool = True
    batch_size: int = Field(1, ge=1)
    prompt_len: int = Field(64, ge=1)
    new_tokens: int = Field(64, ge=1)
    repeats: int = Field(3, ge=1)


class EvalParams(_Strict):
    ppl_seq_len: int = Field(128, ge=8)
    ppl_batch_size: int = Field(8, ge=1)
    ppl_blocks: int = Field(128, ge=1, description="evaluation blocks per corpus (the first ones)")
    curve_blocks: int = Field(32, ge=0, description="a search's quality-vs-cost curve: perplexity of its validated "
                              "masks over the search, on this many blocks of the first corpus (0: off)")
    zero_shot: bool = True
    zero_shot_tasks: list[str] = ["local"]
    zero_shot_limit: int | None = Field(None, ge=1)
    zero_shot_batch_size: int = Field(16, ge=1)
    zero_shot_metric: Literal["acc", "acc_norm"] = "acc"
    speed: SpeedParams = SpeedParams()


class CompareParams(_Strict):
    sparsities: list[float] = Field([0.2, 0.5], description="sparsities every method is run and evaluated at "
                                    "(30% left out of the default cells for time: README 'Which cells the pipeline "
                                    "runs')")
    searches: list[SearchMethodName] = Field(["pg"], description="policy-gradient methods (pgprune/methods.py): "
                                             "pg (free widths), pg_uniform (stock layout; not in the default cells: "
                                             "README 'Which cells the pipeline runs')")
    baselines: list[MetricMethodName] = Field(["flap", "flap_refit", "slimgpt"], description="metric baselines "
                                              "(pgprune/methods.py); the default cells separate FLAP's mask with its "
                                              "bias-only compensation (flap) from the same mask refit (flap_refit), "
                                              "and SlimGPT (its own OBS-chosen masks, refit); wanda_sp is not in "
                                              "them (README 'Which cells the pipeline runs')")

    @field_validator("sparsities")
    @classmethod
    def _range(cls, v):
        bad = [s for s in v if not 0 < s < 1]
        if bad or not v:
            raise ValueError(f"sparsities {bad or v} must be non-empty and each in (0, 1)")
        if len(set(v)) != len(v):
            raise ValueError(f"sparsities repeat: {v}")
        return v


class ExportParams(_Strict):
    method: MethodName = Field("pg", description="whose masks make models/pruned (pg_uniform or a uniform metric "
                               "baseline gives a stock-architecture model)")
    sparsity: float = Field(0.5, gt=0, lt=1, description="one of compare.sparsities")
    save_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


class RefitParams(_Strict):
    """The least-squares refit (compensation ``refit``, pgprune/core/refit.py) of every method that uses it."""

    damp: float = Field(0.01, ge=0, description="damping of the refit's least squares, a fraction of the mean "
                        "diagonal of the kept inputs' Gram matrix (raised automatically where singular)")
    blocks: int = Field(128, ge=1, description="calibration blocks (the first of data.calib_blocks) the refit "
                        "propagates and fits on")
    batch_size: int = Field(8, ge=1, description="calibration blocks per forward of the refit")


class RecoverParams(RecoverSettings):
    """recover.*: the pipeline's recovery cells (stage ``recover@<method>-<S>`` for every method in ``methods`` and
    sparsity in ``sparsities``, then ``evaluate_recovered@<method>-<S>``) and the recovery settings they run with.
    The settings are :class:`pgprune.recovery.settings.RecoverSettings`'s fields, so their values here are also what
    `pgprune recover` and pgprune.recover() use (flags and keyword arguments override them)."""

    methods: list[MethodName] = Field(["pg", "flap_refit"], description="methods whose masks are recovered (each "
                                      "one of compare.searches + compare.baselines; [] runs no recovery)")
    sparsities: list[float] = Field([0.5], description="sparsities recovered (each one of compare.sparsities)")
    curve_every: int = Field(25, ge=0, description="steps between the points of the recovery curve: held-out "
                             "perplexity of eval.curve_blocks blocks of the first evaluation corpus (0: before and "
                             "after only)")

    def settings(self) -> RecoverSettings:
        """The recovery settings alone (without the cells)."""
        return RecoverSettings.model_validate(self.model_dump(include=set(RecoverSettings.model_fields)))


class ReportParams(_Strict):
    title: str = "pgprune report"


class Params(_Strict):
    model: ModelParams = ModelParams()
    data: DataParams = DataParams()
    init: InitParams = InitParams()
    search: SearchParams = Field(default_factory=lambda: SearchParams(
        at_sparsity=copy.deepcopy(list(DEFAULT_SEARCH_RULES))))
    eval: EvalParams = EvalParams()
    compare: CompareParams = CompareParams()
    export: ExportParams = ExportParams()
    refit: RefitParams = RefitParams()
    recover: RecoverParams = RecoverParams()
    report: ReportParams = ReportParams()

    @field_validator("search", mode="before")
    @classmethod
    def _default_rules(cls, v):
        """A search section without ``at_sparsity`` takes DEFAULT_SEARCH_RULES, like every other key not given."""
        if isinstance(v, dict) and "at_sparsity" not in v:
            return {**v, "at_sparsity": copy.deepcopy(list(DEFAULT_SEARCH_RULES))}
        return v

    @model_validator(mode="after")
    def _cross(self):
        if self.search.init not in self.init.scorers:
            raise ValueError(f"search.init={self.search.init!r} must be one of init.scorers={self.init.scorers}")
        if self.search.compensation != "none" and not ("flap" in self.init.scorers and
                                                       self.init.flap_bias_compensation):
            raise ValueError(f"search.compensation={self.search.compensation!r} needs the calibration means of the "
                             "'flap' scorer: add 'flap' to init.scorers and set init.flap_bias_compensation: true "
                             "(or set search.compensation: none)")
        for m in self.compare.baselines:
            scorer = METHODS[m].scorer
            if scorer is not None and scorer not in self.init.scorers:
                raise ValueError(f"compare.baselines has {m!r}, which needs the scorer {scorer!r}: add it to "
                                 f"init.scorers={self.init.scorers} or remove {m!r}")
        if self.export.sparsity not in self.compare.sparsities:
            raise ValueError(f"export.sparsity={self.export.sparsity} must be one of compare.sparsities="
                             f"{self.compare.sparsities} (its masks are computed there)")
        if self.export.method not in [*self.compare.searches, *self.compare.baselines]:
            raise ValueError(f"export.method={self.export.method!r} must be one of compare.searches + "
                             f"compare.baselines={[*self.compare.searches, *self.compare.baselines]}")
        cells = [*self.compare.searches, *self.compare.baselines]
        no_recovery = not (self.recover.methods and self.recover.sparsities)  # an empty list: no recover cell
        for m in [] if no_recovery else self.recover.methods:
            if m not in cells:
                raise ValueError(f"recover.methods has {m!r}, which is not computed: allowed: compare.searches + "
                                 f"compare.baselines={cells}")
        for s in [] if no_recovery else self.recover.sparsities:
            if s not in self.compare.sparsities:
                raise ValueError(f"recover.sparsities has {s}, which is not computed: allowed: compare.sparsities="
                                 f"{self.compare.sparsities}")
        if self.model.offload != "none" and self.model.device == "cpu" and self.model.offload == "cpu":
            raise ValueError("model.offload='cpu' with model.device='cpu' changes nothing; use offload 'none' "
                             "(or 'disk' to keep the weights out of memory)")
        return self


def format_validation_error(err: ValidationError, source: str) -> str:
    """The errors of ``source``'s parameters, one "key: message (got value)" line each."""
    return "\n".join([f"invalid parameters in {source}:",
                      *(f"  {line}" for line in validation_messages(err, show_input=True))])


def parse_params(data: dict | None, source: str = "params") -> Params:
    try:
        return Params.model_validate(data or {})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"parameter file '{p}' not found (expected params.yaml at the repository root)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from None
    return parse_params(data, str(p))


def default_params_yaml() -> str:
    return yaml.safe_dump(Params().model_dump(mode="json"), sort_keys=False)


def _leaf_fields(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaf_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", f


def params_reference(dvc_yaml: dict | None = None) -> str:
    """Markdown table of every params.yaml key: default, meaning (the schema's descriptions) and, with the parsed
    dvc.yaml, the stages whose cached results it invalidates directly (DVC then reruns everything downstream of
    them). ``python -m pgprune.config`` prints it for the repository's dvc.yaml; docs/parameters.md is that text (tested)."""
    import re

    stages = (dvc_yaml or {}).get("stages") or {}
    templated = set(re.findall(r"\$\{([a-z_]+\.[a-z_]+)\}", yaml.safe_dump(dvc_yaml or {})))

    def hit(key: str) -> str:
        names = [n for n, st in stages.items()
                 if any(key == p or key.startswith(p + ".") for p in st.get("params") or [])]
        if key in templated:
            names.append("which cells exist" if key.startswith(("compare.", "recover.")) else "export's inputs")
        return ", ".join(f"`{n}`" if " " not in n else n for n in names) or "–"

    defaults = Params().model_dump(mode="json")
    lines = ["| key | default | what it does | invalidates |", "|---|---|---|---|"]
    for key, f in _leaf_fields(Params):
        default = defaults
        for part in key.split("."):
            default = default[part]
        desc = (f.description or "").replace("|", "\\|")
        if not desc:
            desc = _DESCRIPTIONS.get(key, "")
        lines.append(f"| `{key}` | `{json_default(default)}` | {desc} | {hit(key) if stages else ''} |")
    return "\n".join(lines) + "\n"


def json_default(value) -> str:
    import json

    return json.dumps(value)


# keys whose schema field carries no description (their names say most of it)
_DESCRIPTIONS = {
    "data.calibration": "calibration text: local (the Debian corpus's calibration split), wikitext2, c4, ptb",
    "data.evaluation": "evaluation texts: local (held-out split), licenses (another genre), wikitext2, c4, ptb",
    "data.local_sources": "Debian sources of the local corpus",
    "data.heldout_fraction": "fraction of the local documents held out for evaluation",
    "data.seq_len": "tokens per calibration block",
    "data.calib_blocks": "calibration blocks (random windows of the calibration text)",
    "data.zero_shot_items": "items of each offline zero-shot task built from the held-out text",
    "data.seed": "seed of the corpus split, calibration windows and tasks",
    "init.batch_size": "calibration blocks per scorer forward",
    "init.flap_bias_compensation": "FLAP's mean (bias) compensation means, used by flap and the search",
    "init.seed": "seed of the random scorer",
    "eval.ppl_seq_len": "tokens per perplexity block",
    "eval.ppl_batch_size": "blocks per perplexity forward",
    "eval.zero_shot": "run the lm-eval zero-shot tasks",
    "eval.zero_shot_tasks": "lm-eval task names; local = the offline tasks of the data stage",
    "eval.zero_shot_limit": "items per task (null: all)",
    "eval.zero_shot_batch_size": "lm-eval batch size",
    "eval.zero_shot_metric": "metric averaged over the tasks",
    "eval.speed.enabled": "measure generation tokens/s",
    "eval.speed.batch_size": "generation batch size",
    "eval.speed.prompt_len": "prompt tokens",
    "eval.speed.new_tokens": "generated tokens",
    "eval.speed.repeats": "timed repetitions (median)",
    "export.save_dtype": "dtype of the saved weights",
    "report.title": "title of report/report.md",
    "search.baseline": "exact/reference estimators: EMA baseline of past losses, or none",
    "search.lr_heads": "learning rate of the KV-group keep-probabilities",
    "search.lr_channels": "learning rate of the channel(-block) keep-probabilities",
    "search.lr_layers": "learning rate of the layer keep-probabilities",
    "search.init_map": "metric -> initial keep-probabilities: const (the metric's mask, see init_free_*), sigmap, "
                       "norm (the reference code's), uniform",
    "search.init_allocation": "allocation of the init metric's mask: uniform (same fraction per layer), global, or "
                              "slimgpt (SlimGPT's masks at the cell's sparsity: its log-increasing per-layer widths "
                              "and OBS-chosen units; the metric orders the units within; heterogeneous layout)",
    "search.granularity": "unit groups searched: heads, channels, layers",
    "search.lr_schedule": "learning-rate schedule over the steps: cosine, const, linear, poly, exp, step",
    "search.penalty_final": "entropy-penalty weight at the last step (linear from penalty_init)",
    "search.max_consecutive_nan_steps": "stop with an error after this many steps whose samples all gave NaN/inf",
    "search.init": "the metric (an init.scorers entry) the search starts from",
}

if __name__ == "__main__":  # pragma: no cover
    import sys

    root = Path(__file__).resolve().parent.parent
    spec = yaml.safe_load((root / "dvc.yaml").read_text()) if (root / "dvc.yaml").exists() else None
    sys.stdout.write(params_reference(spec))
