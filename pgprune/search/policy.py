"""Policy-gradient (REINFORCE) mask search over Bernoulli keep-probabilities, forward passes only."""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm.auto import tqdm

from pgprune.errors import BudgetError, ConfigError, NaNLossError, PgpruneError
from pgprune.io import torch_save
from pgprune.search.estimators import advance_baseline, penalty_gradient, sample_weights, score
from pgprune.search.projection import project_budget, select_top_k
from pgprune.search.schedules import lr_factor, penalty_weight

CHECKPOINT_FORMAT = "pgprune.search/1"
_OPERATIONAL_FIELDS = {"checkpoint_every", "max_consecutive_nan_steps"}  # do not change the result

LossFn = Callable[[dict[str, torch.Tensor], int, int], float]


@dataclass(frozen=True)
class GroupSpec:
    """One group of units sharing a budget: ``size`` units, keep at most ``budget`` in expectation,
    base learning rate ``lr``, optional ``segments`` (segment id per unit, e.g. the layer index)."""

    size: int
    budget: float
    lr: float
    segments: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self):
        if int(self.size) != self.size or self.size < 1:
            raise ConfigError(f"group size must be a positive integer, got {self.size}.")
        if not 0.0 <= float(self.budget) <= self.size:
            raise BudgetError(f"budget {self.budget} is outside the allowed range [0, {self.size}].")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"group lr must be a positive finite number, got {self.lr}.")
        if self.segments is not None:
            if self.segments.numel() != self.size or self.segments.is_floating_point():
                raise ConfigError(f"segments must be an integer tensor with {self.size} entries, got "
                                  f"{self.segments.dtype} with {self.segments.numel()}.")

    def describe(self) -> dict[str, Any]:
        seg = None
        if self.segments is not None:
            seg = hashlib.sha256(self.segments.to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()
        return {"size": int(self.size), "budget": float(self.budget), "lr": float(self.lr), "segments": seg}


class SearchSettings(BaseModel):
    """Settings of the mask search (validated; unknown fields are rejected)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(ge=1, description="total number of search steps T")
    samples: int = Field(2, ge=1, description="mask samples K per step")
    estimator: Literal["exact", "loo", "reference"] = "exact"
    baseline: Literal["ema", "none"] = "ema"
    ema_window: float = Field(5.0, ge=1.0, description="EMA window W (coefficient 1/W)")
    lr_schedule: Literal["cosine", "const", "linear", "poly", "exp", "step"] = "cosine"
    lr_milestones: list[int] = Field(default_factory=list, description="steps where 'step' multiplies lr by 0.1")
    lr_power: float = Field(0.9, gt=0)
    lr_gamma: float = Field(0.995, gt=0)
    penalty_init: float = Field(-1.0, description="entropy-penalty weight at step 0; < 0 turns it off")
    penalty_final: float = 0.0
    eps: float = Field(1e-4, gt=0, lt=0.5, description="clamp of s in the exact score's denominator")
    seed: int = 42
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0: only at the end)")
    max_consecutive_nan_steps: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _enough_samples(self):
        if self.estimator in ("loo", "reference") and self.samples < 2:
            raise ValueError(f"samples: estimator '{self.estimator}' needs samples >= 2, got {self.samples}")
        return self

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> "SearchSettings":
        """Validate a mapping, raising ConfigError that names each bad field."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            msgs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors())
            raise ConfigError(f"invalid search settings: {msgs}") from e


@dataclass
class SearchResult:
    """Final probabilities, per-step history, and how many steps were done (``completed`` if all)."""

    probs: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    steps_done: int
    groups: dict[str, GroupSpec]
    completed: bool = True
    best_probs: dict[str, torch.Tensor] | None = None
    best_step: int | None = None
    validation: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0  # wall-clock time of the search, summed over interrupted and resumed runs

    def final_masks(self, keep_counts: Mapping[str, int] | None = None,
                    min_per_segment: Mapping[str, int] | None = None,
                    allowed: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Exact top-k mask per group (default k = floor(budget)), see :func:`select_top_k`."""
        keep_counts, min_per_segment, allowed = keep_counts or {}, min_per_segment or {}, allowed or {}
        unknown = sorted((set(keep_counts) | set(min_per_segment) | set(allowed)) - set(self.probs))
        if unknown:
            raise ConfigError(f"unknown group(s) {unknown}; groups are {sorted(self.probs)}.")
        out = {}
        for name, p in self.probs.items():
            spec = self.groups[name]
            k = keep_counts.get(name, int(math.floor(spec.budget + 1e-9)))
            out[name] = select_top_k(p, k, segments=spec.segments, min_per_segment=min_per_segment.get(name, 0),
                                     allowed=allowed.get(name))
        return out


def _entropy(p: torch.Tensor) -> float:
    p = p.to(torch.float64)
    return float((torch.special.entr(p) + torch.special.entr(1.0 - p)).mean())


class PolicyGradientSearch:
    """REINFORCE search: sample masks, evaluate losses, SGD step on s per group, project onto the budget."""

    def __init__(self, groups: Mapping[str, GroupSpec], init_probs: Mapping[str, torch.Tensor],
                 settings: SearchSettings | Mapping[str, Any]):
        self.settings = settings if isinstance(settings, SearchSettings) else SearchSettings.parse(settings)
        self.groups = dict(groups)
        if not self.groups:
            raise ConfigError("at least one group is required.")
        if set(self.groups) != set(init_probs):
            raise ConfigError(f"groups {sorted(self.groups)} and initial probs {sorted(init_probs)} differ.")
        self.init_probs: dict[str, torch.Tensor] = {}
        for name, spec in self.groups.items():
            p = init_probs[name].detach().cpu().reshape(-1)
            if p.numel() != spec.size:
                raise ConfigError(f"group '{name}': initial probs have {p.numel()} entries, size is {spec.size}.")
            if p.dtype not in (torch.float32, torch.float64):
                p = p.to(torch.float32)
            if not bool(torch.isfinite(p).all()):
                raise PgpruneError(f"group '{name}': initial probs contain NaN or inf.")
            self.init_probs[name] = project_budget(p, spec.budget)

    @property
    def fingerprint(self) -> str:
        """Hash of the settings that change the result, the group specs and the initial probs."""
        s = {k: v for k, v in self.settings.model_dump().items() if k not in _OPERATIONAL_FIELDS}
        doc = {"settings": s, "groups": {n: g.describe() for n, g in sorted(self.groups.items())},
               "init": {n: hashlib.sha256(p.contiguous().numpy().tobytes()).hexdigest()
                        for n, p in sorted(self.init_probs.items())}}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    # ---- state and checkpoints -------------------------------------------------------------
    def _fresh_state(self) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(self.settings.seed)
        return {"step": 0, "probs": {n: p.clone() for n, p in self.init_probs.items()}, "baseline": None,
                "generator": gen.get_state(), "history": [], "nan_streak": 0, "best": None, "validation": []}

    def _load(self, path: Path) -> dict[str, Any]:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"'{path}' is not a pgprune search checkpoint; delete it or pick another path.")
        if ckpt["fingerprint"] != self.fingerprint:
            raise ConfigError(f"checkpoint '{path}' was written with different search settings, groups or initial "
                              f"probabilities (fingerprint {ckpt['fingerprint']} != {self.fingerprint}); delete the "
                              f"checkpoint to start over, or restore the settings it was made with.")
        return ckpt

    def _save(self, path: Path, state: dict[str, Any]) -> None:
        torch_save({"format": CHECKPOINT_FORMAT, "fingerprint": self.fingerprint,
                    "settings": self.settings.model_dump(), **state}, path)

    # ---- the search ------------------------------------------------------------------------
    def run(self, loss_fn: LossFn, *, checkpoint_path: str | Path | None = None, progress: bool = True,
            stop_after: int | None = None, on_step: Callable[[dict[str, Any]], None] | None = None,
            validate_fn: Callable[[dict[str, torch.Tensor]], float] | None = None,
            validate_every: int = 0) -> SearchResult:
        """Run (or resume from ``checkpoint_path``) the search; ``loss_fn(masks, step, sample) -> float``.

        ``masks`` maps each group to a 1-D CPU bool tensor (True = keep); the caller moves it to its device and
        picks the calibration batch from ``step``. A step whose samples are all non-finite is skipped (no update,
        but it still counts as a step). ``stop_after``: stop (and checkpoint) once this many steps are done.
        A KeyboardInterrupt saves a checkpoint of the last completed step before propagating. ``on_step`` gets
        each step's history entry.

        ``validate_fn(probs) -> float`` (optional) scores the current probabilities, e.g. the loss of their hard
        top-k mask on held-back calibration data; it runs before the first step, every ``validate_every`` steps
        and after the last one, and the result remembers the best probabilities (``best_probs``, ``best_step``).
        """
        cfg = self.settings
        path = Path(checkpoint_path) if checkpoint_path is not None else None
        state = self._load(path) if path is not None and path.exists() else self._fresh_state()
        t_start, elapsed_before = time.perf_counter(), float(state.get("elapsed_s", 0.0))

        def elapsed() -> float:  # the whole search's time, summed over interrupted and resumed runs
            return elapsed_before + time.perf_counter() - t_start

        def save(st: dict[str, Any]) -> None:
            st["elapsed_s"] = elapsed()
            self._save(path, st)

        gen = torch.Generator()
        gen.set_state(state["generator"])
        end = cfg.steps if stop_after is None else min(cfg.steps, max(int(stop_after), state["step"]))
        bar = tqdm(total=cfg.steps, initial=state["step"], disable=not progress, desc="pg-search", dynamic_ncols=True)
        state.setdefault("best", None)
        state.setdefault("validation", [])
        try:
            with torch.no_grad():
                if validate_fn is not None and state["best"] is None:
                    self._validate(state, validate_fn)
                while state["step"] < end:
                    state, entry = self._step(state, gen, loss_fn)  # state is replaced only once a step is done
                    if validate_fn is not None and ((validate_every and state["step"] % validate_every == 0)
                                                    or state["step"] == cfg.steps):
                        entry["val_loss"] = self._validate(state, validate_fn)
                    bar.update(1)
                    if entry["n_valid"]:
                        bar.set_postfix(loss=f"{entry['loss_mean']:.4f}", baseline=f"{entry['baseline']:.4f}",
                                        refresh=False)
                    if on_step is not None:
                        on_step(entry)
                    if path is not None and cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                        save(state)
        except KeyboardInterrupt:
            if path is not None:
                save(state)
            raise
        finally:
            bar.close()
        if path is not None:
            save(state)
        best = state.get("best")
        return SearchResult(probs={n: p.clone() for n, p in state["probs"].items()}, history=list(state["history"]),
                            steps_done=state["step"], groups=self.groups, completed=state["step"] >= cfg.steps,
                            best_probs=None if best is None else {n: p.clone() for n, p in best["probs"].items()},
                            best_step=None if best is None else best["step"],
                            validation=list(state.get("validation", [])),
                            elapsed_s=elapsed())

    @staticmethod
    def _validate(state: dict[str, Any], validate_fn) -> float:
        value = float(validate_fn({n: p.clone() for n, p in state["probs"].items()}))
        state["validation"] = list(state.get("validation", [])) + [{"step": state["step"], "val_loss": value}]
        best = state.get("best")
        if math.isfinite(value) and (best is None or value < best["loss"]):
            state["best"] = {"loss": value, "step": state["step"],
                             "probs": {n: p.clone() for n, p in state["probs"].items()}}
        return value

    def _step(self, state: dict[str, Any], gen: torch.Generator, loss_fn: LossFn) -> tuple[dict[str, Any], dict]:
        """One step; returns (new state, history entry); ``state`` only gains the history entry, at the very end."""
        cfg, t, probs = self.settings, state["step"], state["probs"]
        masks = [{n: torch.rand(p.numel(), generator=gen, dtype=p.dtype) < p for n, p in probs.items()}
                 for _ in range(cfg.samples)]
        losses = [float(loss_fn(m, t, j)) for j, m in enumerate(masks)]
        valid = [j for j, v in enumerate(losses) if math.isfinite(v)]
        if len(valid) < cfg.samples:
            bad = [losses[j] for j in range(cfg.samples) if j not in valid]
            warnings.warn(f"search step {t}: {len(bad)}/{cfg.samples} sampled masks gave a non-finite loss {bad}; "
                          f"dropped them" + ("" if valid else " and skipped the step"), RuntimeWarning, stacklevel=3)
        factor = lr_factor(cfg.lr_schedule, t, cfg.steps, power=cfg.lr_power, gamma=cfg.lr_gamma,
                           milestones=cfg.lr_milestones)
        entry: dict[str, Any] = {"step": t, "loss_mean": None, "loss_min": None, "baseline": None, "lr": factor,
                                 "n_valid": len(valid)}
        new = dict(state, step=t + 1, generator=gen.get_state())
        if not valid:
            new["nan_streak"] = state["nan_streak"] + 1
            if new["nan_streak"] >= cfg.max_consecutive_nan_steps:
                raise NaNLossError(f"all {cfg.samples} sampled masks gave non-finite losses for "
                                   f"{new['nan_streak']} consecutive steps (up to step {t}); check the model dtype "
                                   f"and calibration data, or raise max_consecutive_nan_steps.")
            new_probs = probs
        else:
            vl = torch.tensor([losses[j] for j in valid], dtype=torch.float64)
            b, new["baseline"] = advance_baseline(cfg.estimator, cfg.baseline, cfg.ema_window, state["baseline"],
                                                  float(vl.mean()))
            w = sample_weights(vl, b, estimator=cfg.estimator, n_samples=cfg.samples)
            pen = penalty_weight(t, cfg.steps, cfg.penalty_init, cfg.penalty_final)
            new_probs = {}
            for n, p in probs.items():
                m = torch.stack([masks[j][n] for j in valid])
                g = w @ score(p, m, estimator=cfg.estimator, eps=cfg.eps)
                g = g + penalty_gradient(p, pen, estimator=cfg.estimator, eps=cfg.eps)
                stepped = p.to(torch.float64) - self.groups[n].lr * factor * g
                new_probs[n] = project_budget(stepped, self.groups[n].budget).to(p.dtype)
            new["nan_streak"] = 0
            entry.update(loss_mean=float(vl.mean()), loss_min=float(vl.min()), baseline=float(b))
        for n, p in new_probs.items():
            entry.update({f"{n}/lr": self.groups[n].lr * factor, f"{n}/prob_sum": float(p.sum(dtype=torch.float64)),
                          f"{n}/prob_mean": float(p.mean(dtype=torch.float64)), f"{n}/entropy": _entropy(p)})
        new["probs"] = new_probs
        new["history"] = state["history"]
        new["history"].append(entry)  # last, after everything that can fail (shared list: no O(T^2) copies)
        return new, entry
