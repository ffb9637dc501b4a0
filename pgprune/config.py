"""The one validated schema of params.yaml. Errors name the key, the bad value and what is allowed."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pgprune.errors import ConfigError

Scorer = Literal["wanda_sp", "flap", "magnitude", "taylor", "shortgpt", "random"]
Method = Literal["pg", "wanda_sp", "flap", "magnitude", "taylor", "random", "layer_drop"]
Group = Literal["heads", "channels", "layers"]
TextSource = Literal["local", "wikitext2", "c4", "ptb"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelParams(_Strict):
    source: str = Field("embedded:smollm2-135m", description="embedded:smollm2-135m, a local folder or a hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    device: str = "cpu"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not (v == "cpu" or v == "mps" or v == "cuda" or v.startswith("cuda:")):
            raise ValueError(f"device={v!r}; allowed: cpu, cuda, cuda:N, mps")
        return v


class DataParams(_Strict):
    calibration: TextSource = "local"
    evaluation: list[TextSource] = ["local"]
    data_files: dict[str, str | list[str]] = Field(default_factory=dict,
                                                   description="local files standing in for a hub dataset")
    local_sources: list[Literal["kjv", "fortunes", "jargon"]] = ["kjv", "fortunes", "jargon"]
    heldout_fraction: float = Field(0.1, gt=0, lt=0.5)
    seq_len: int = Field(128, ge=8, le=32768)
    calib_blocks: int = Field(512, ge=1)
    eval_blocks: int = Field(256, ge=1)
    zero_shot_items: int = Field(200, ge=4)
    seed: int = 0

    @field_validator("evaluation")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("at least one evaluation corpus is needed; allowed: local, wikitext2, c4, ptb")
        return v


class InitParams(_Strict):
    nsamples: int = Field(64, ge=1, description="calibration blocks used by the metrics")
    batch_size: int = Field(8, ge=1)
    scorers: list[Scorer] = ["wanda_sp", "flap", "magnitude", "taylor", "shortgpt", "random"]
    flap_bias_compensation: bool = True
    seed: int = 0


class SearchParams(_Strict):
    sparsity: float = Field(0.3, gt=0, lt=1, description="fraction of decoder linear parameters removed")
    granularity: list[Group] = ["heads", "channels"]
    layer_sparsity: float = Field(0.0, ge=0, lt=1, description="fraction of layers dropped when 'layers' is searched")
    init: Scorer = "flap"
    init_map: Literal["sigmap", "norm", "const", "uniform"] = "const"
    init_allocation: Literal["global", "uniform"] = "uniform"
    init_const: float = Field(0.95, gt=0.5, le=1.0, description="keep-probability of the init mask's units with "
                              "init_map: const (1 - init_const for the others)")
    init_free_heads: float = Field(0.5, ge=0, lt=1, description="init_map: const: fraction of the head budget left "
                                   "undecided at the metric's boundary (keep-probability 0.55 just inside, 0.45 just "
                                   "outside), so the search can trade those units; 0 starts every unit decided")
    init_free_channels: float = Field(0.0, ge=0, lt=1, description="the same for MLP channels")
    steps: int = Field(200, ge=1)
    samples: int = Field(2, ge=1, description="K masks sampled per step")
    batch_size: int = Field(8, ge=1)
    lr_heads: float = Field(0.1, gt=0)
    lr_channels: float = Field(0.02, gt=0)
    lr_layers: float = Field(0.02, gt=0)
    lr_schedule: Literal["cosine", "const", "linear", "poly", "exp", "step"] = "cosine"
    estimator: Literal["exact", "loo", "reference"] = "loo"
    baseline: Literal["ema", "none"] = "ema"
    ema_window: int = Field(5, ge=1)
    penalty_init: float = -1.0
    penalty_final: float = 0.0
    eps: float = Field(1e-4, gt=0, lt=0.5)
    min_heads_per_layer: int = Field(1, ge=1)
    bias_compensation: bool = Field(True, description="replace removed o_proj/down_proj inputs by their calibration "
                                    "means during the search and in the sliced model (needs the flap scorer)")
    checkpoint_every: int = Field(50, ge=0)
    validate_every: int = Field(10, ge=0, description="steps between hard-mask validations (0: start and end only)")
    val_blocks: int = Field(32, ge=0, description="calibration blocks held back to validate hard masks (0: off)")
    select: Literal["best", "last"] = Field("best", description="final mask: best validated, or the last probs")
    seed: int = 42

    @model_validator(mode="after")
    def _check(self):
        if not self.granularity:
            raise ValueError("search.granularity is empty; allowed entries: heads, channels, layers")
        if "layers" in self.granularity and self.layer_sparsity == 0 and len(self.granularity) > 1:
            raise ValueError("search.granularity includes 'layers' with heads/channels: set search.layer_sparsity > 0")
        return self


class SliceParams(_Strict):
    save_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


class SpeedParams(_Strict):
    batch_size: int = Field(1, ge=1)
    prompt_len: int = Field(64, ge=1)
    new_tokens: int = Field(64, ge=1)
    repeats: int = Field(3, ge=1)


class EvalParams(_Strict):
    ppl_seq_len: int = Field(128, ge=8)
    ppl_batch_size: int = Field(8, ge=1)
    zero_shot_tasks: list[str] = ["local"]
    zero_shot_limit: int | None = Field(None, ge=1)
    zero_shot_batch_size: int = Field(16, ge=1)
    zero_shot_metric: Literal["acc", "acc_norm"] = "acc"
    speed: SpeedParams = SpeedParams()


class CompareParams(_Strict):
    sparsities: list[float] = [0.2, 0.3, 0.5]
    methods: list[Method] = ["pg", "wanda_sp", "flap", "magnitude", "taylor", "random", "layer_drop"]
    zero_shot: bool = True
    speed: bool = True

    @field_validator("sparsities")
    @classmethod
    def _range(cls, v):
        bad = [s for s in v if not 0 < s < 1]
        if bad or not v:
            raise ValueError(f"sparsities {bad or v} must be non-empty and each in (0, 1)")
        return v


class ReportParams(_Strict):
    title: str = "pgprune report"


class Params(_Strict):
    model: ModelParams = ModelParams()
    data: DataParams = DataParams()
    init: InitParams = InitParams()
    search: SearchParams = SearchParams()
    slice: SliceParams = SliceParams()
    eval: EvalParams = EvalParams()
    compare: CompareParams = CompareParams()
    report: ReportParams = ReportParams()

    @model_validator(mode="after")
    def _cross(self):
        if self.search.init not in self.init.scorers:
            raise ValueError(f"search.init={self.search.init!r} must be one of init.scorers={self.init.scorers}")
        if self.search.bias_compensation and not ("flap" in self.init.scorers and self.init.flap_bias_compensation):
            raise ValueError("search.bias_compensation needs the calibration means of the 'flap' scorer: add 'flap' "
                             "to init.scorers and set init.flap_bias_compensation: true (or turn it off)")
        return self


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        val = e.get("input")
        shown = "" if isinstance(val, dict) else f" (got {val!r})"
        lines.append(f"  {key}: {e['msg']}{shown}")
    return "\n".join(lines)


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
