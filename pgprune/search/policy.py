"""Policy-gradient (REINFORCE) mask search over Bernoulli keep-probabilities, forward passes only."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from pgprune.errors import BudgetError, ConfigError, NaNLossError, PgpruneError
from pgprune.io import write_bytes
from pgprune.search.estimators import (
    PAIRED,
    advance_baseline,
    antithetic_masks,
    disarm_gradient,
    penalty_gradient,
    prefix_score,
    sample_weights,
    score,
)
from pgprune.search.projection import isotonic_nonincreasing, project_budget, project_segments
from pgprune.search.schedules import lr_factor, penalty_weight
from pgprune.search.settings import SearchSettings

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "pgprune.search/2"
CHECKPOINT_MAGIC = b"PGPRUNE-SEARCH-CHECKPOINT/2"
_OPERATIONAL_FIELDS = {"checkpoint_every", "max_consecutive_nan_steps"}  # do not change the result

# losses_fn(masks of the K samples, step) -> K losses
LossesFn = Callable[[list[dict[str, torch.Tensor]], int], "Sequence[float] | torch.Tensor"]


@dataclass(frozen=True)
class GroupSpec:
    """One group of units sharing a budget: ``size`` units, keep at most ``budget`` in expectation, base learning
    rate ``lr``; optional ``segments`` (segment id per unit, e.g. the layer index) and ``segment_budgets`` (one
    budget per segment id 0..S-1: the probabilities are then projected segment by segment, so every segment keeps
    its own expected count, e.g. the same width in every layer; ``budget`` must be their sum).

    ``ordered``: the units of each segment are in rank order (best first) and the group samples *prefixes*: one
    uniform u per segment keeps unit j iff u < s_j, with s kept non-increasing within a segment, so s_j is the
    probability that the segment keeps at least its first j units: a distribution over each segment's width
    (``widths`` search policy) rather than independent units."""

    size: int
    budget: float
    lr: float
    segments: torch.Tensor | None = field(default=None, compare=False)
    segment_budgets: tuple[float, ...] | None = None
    ordered: bool = False

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
        if self.ordered and self.segments is None:
            raise ConfigError("an ordered group needs segments (the segment id of every unit).")
        if self.segment_budgets is not None:
            if self.segments is None:
                raise ConfigError("segment_budgets need segments (the segment id of every unit).")
            n_seg = int(self.segments.max()) + 1
            if len(self.segment_budgets) != n_seg:
                raise ConfigError(f"{len(self.segment_budgets)} segment budgets for {n_seg} segments.")
            if abs(sum(self.segment_budgets) - float(self.budget)) > 1e-6:
                raise BudgetError(f"segment budgets sum to {sum(self.segment_budgets)}, the group budget is "
                                  f"{self.budget}.")

    def project(self, s: torch.Tensor) -> torch.Tensor:
        """Euclidean projection onto this group's budget (per segment when segment_budgets are set; onto
        non-increasing segments first when ordered)."""
        if self.ordered:
            s = isotonic_nonincreasing(s, self.segments)
        if self.segment_budgets is None:
            return project_budget(s, self.budget)
        return project_segments(s, self.segments, self.segment_budgets)

    def sample(self, s: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One mask: independent Bernoulli(s) draws, or a prefix of each segment for an ordered group."""
        if not self.ordered:
            return torch.rand(s.numel(), generator=generator, dtype=s.dtype) < s
        u = torch.rand(int(self.segments.max()) + 1, generator=generator, dtype=s.dtype)
        return u[self.segments] < s

    def describe(self) -> dict[str, Any]:
        seg = None
        if self.segments is not None:
            seg = hashlib.sha256(self.segments.to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()
        return {"size": int(self.size), "budget": float(self.budget), "lr": float(self.lr), "segments": seg,
                "segment_budgets": None if self.segment_budgets is None else [float(b) for b in
                                                                              self.segment_budgets],
                "ordered": bool(self.ordered)}


@dataclass
class SearchResult:
    """Final probabilities, per-step history, and how many steps were done (``completed`` if all, or if the search
    stopped early: ``stopped_early``, search.patience)."""

    probs: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    steps_done: int
    groups: dict[str, GroupSpec]
    completed: bool = True
    best_probs: dict[str, torch.Tensor] | None = None
    best_step: int | None = None
    validation: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0  # wall-clock time of the search, summed over interrupted and resumed runs
    resumed_from: int = 0  # the step a checkpoint resumed from (0: a fresh start)
    forward_passes: int = 0  # sampled-mask loss evaluations (K per step), over all runs
    # with record_trajectory: at every validation {"step", "forward_passes", "elapsed_s", "val_loss", "probs"}
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False

    def selected_probs(self, select: str = "best") -> dict[str, torch.Tensor]:
        """The probabilities of the best validated step (``select="best"``, when validation ran) or the last."""
        if select not in ("best", "last"):
            raise ConfigError(f"select={select!r}; allowed: best, last")
        return self.best_probs if (select == "best" and self.best_probs is not None) else self.probs


def _entropy(p: torch.Tensor) -> float:
    p = p.to(torch.float64)
    return float((torch.special.entr(p) + torch.special.entr(1.0 - p)).mean())


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class CheckpointDamaged(PgpruneError):
    """A checkpoint file that cannot be trusted (truncated, garbage, flipped bytes, other settings)."""


def damaged_name(path: Path) -> Path:
    """A new name to move a damaged checkpoint aside to: ``<name>.damaged-<UTC time to the microsecond>``, with
    ``-<n>`` added when that name is taken (two moved aside in the same instant never overwrite each other)."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
        n += 1
    return aside


class PolicyGradientSearch:
    """REINFORCE search: sample masks, evaluate losses, SGD step on s per group, project onto the budget.

    ``seed`` seeds the search's own generator (mask sampling); ``key`` is the caller's digest of everything else
    the losses depend on (model weights, dtype, device, calibration data, compensation ...). The fingerprint
    hashes the settings, groups, initial probabilities, seed and key: a checkpoint is only ever resumed by a search
    with the same fingerprint (its file name holds it, and its content is verified on load).
    """

    def __init__(self, groups: Mapping[str, GroupSpec], init_probs: Mapping[str, torch.Tensor],
                 settings: SearchSettings | Mapping[str, Any], *, seed: int = 0, key: str = ""):
        self.settings = settings if isinstance(settings, SearchSettings) else SearchSettings.parse(settings)
        self.seed, self.key = int(seed), str(key)
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
            self.init_probs[name] = spec.project(p)

    @property
    def fingerprint(self) -> str:
        """Hash of everything that changes the result: settings (but the operational ones), group specs,
        initial probabilities, seed and the caller's key."""
        s = {k: v for k, v in self.settings.model_dump(mode="json").items() if k not in _OPERATIONAL_FIELDS}
        doc = {"format": CHECKPOINT_FORMAT, "settings": s, "seed": self.seed, "key": self.key,
               "groups": {n: g.describe() for n, g in sorted(self.groups.items())},
               "init": {n: _digest(p.contiguous().numpy().tobytes()) for n, p in sorted(self.init_probs.items())}}
        return _digest(json.dumps(doc, sort_keys=True).encode())[:20]

    def checkpoint_file(self, directory: str | Path) -> Path:
        """Where this search's checkpoint lives in ``directory`` (the name holds the fingerprint)."""
        return Path(directory) / f"search-{self.fingerprint}.ckpt"

    # ---- state and checkpoints -------------------------------------------------------------
    def _fresh_state(self) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(self.seed)
        return {"step": 0, "probs": {n: p.clone() for n, p in self.init_probs.items()}, "baseline": None,
                "generator": gen.get_state(), "history": [], "nan_streak": 0, "best": None, "validation": [],
                "elapsed_s": 0.0, "forward_passes": 0, "trajectory": []}

    def _load(self, path: Path) -> dict[str, Any]:
        """Read and verify a checkpoint; CheckpointDamaged says why it cannot be used."""
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise CheckpointDamaged(f"cannot read '{path}': {e}") from None
        head, sep, payload = raw.partition(b"\n")
        parts = head.split(b" ")
        if not sep or len(parts) != 3 or parts[0] != CHECKPOINT_MAGIC:
            raise CheckpointDamaged(f"'{path}' is not a pgprune search checkpoint (bad header)")
        if parts[1].decode(errors="replace") != self.fingerprint:
            raise CheckpointDamaged(f"'{path}' was written by another search (fingerprint "
                                    f"{parts[1].decode(errors='replace')}, this search: {self.fingerprint})")
        if _digest(payload) != parts[2].decode(errors="replace"):
            raise CheckpointDamaged(f"'{path}' is damaged (its content does not match its sha256; truncated or "
                                    "modified)")
        try:
            ckpt = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
            raise CheckpointDamaged(f"'{path}' cannot be unpickled: {type(e).__name__}: {e}") from None
        if not isinstance(ckpt, dict) or ckpt.get("fingerprint") != self.fingerprint or "state" not in ckpt:
            raise CheckpointDamaged(f"'{path}' holds no state of this search")
        return ckpt["state"]

    def _save(self, path: Path, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save({"fingerprint": self.fingerprint, "settings": self.settings.model_dump(mode="json"),
                    "seed": self.seed, "state": state}, buf)
        payload = buf.getvalue()
        header = b" ".join([CHECKPOINT_MAGIC, self.fingerprint.encode(), _digest(payload).encode()]) + b"\n"
        write_bytes(path, header + payload)

    def _resume_or_start(self, path: Path | None) -> dict[str, Any]:
        if path is None or not path.exists():
            return self._fresh_state()
        try:
            return self._load(path)
        except CheckpointDamaged as e:
            aside = damaged_name(path)
            path.replace(aside)
            warnings.warn(f"{e}; moved it to '{aside}' and starting the search over", RuntimeWarning, stacklevel=3)
            return self._fresh_state()

    # ---- the search ------------------------------------------------------------------------
    def run(self, losses_fn: LossesFn, *, checkpoint_dir: str | Path | None = None, progress: bool = True,
            stop_after: int | None = None, on_step: Callable[[dict[str, Any]], None] | None = None,
            validate_fn: Callable[[dict[str, torch.Tensor]], float] | None = None,
            validate_every: int = 0, keep_checkpoint: bool = False,
            record_trajectory: bool = False) -> SearchResult:
        """Run (or resume from this search's checkpoint in ``checkpoint_dir``) the search.

        ``losses_fn(masks, step) -> K losses``: ``masks`` is a list of K samples, each mapping a group to a 1-D
        CPU bool tensor (True = keep); the caller evaluates them on calibration batch ``step`` (cycled) and
        returns their losses (a sequence or a tensor; non-finite ones are dropped with a warning, a step whose
        samples are all non-finite is skipped but still counts). ``stop_after``: stop (and checkpoint) once this
        many steps are done. A KeyboardInterrupt saves a checkpoint of the last completed step before
        propagating. The checkpoint is deleted once the search completes (``keep_checkpoint`` keeps it).
        ``on_step`` gets each step's history entry.

        ``validate_fn(probs) -> float`` (optional) scores the current probabilities, e.g. the loss of their hard
        top-k mask on held-back calibration data; it runs before the first step, every ``validate_every`` steps
        and after the last one, and the result remembers the best probabilities (``best_probs``, ``best_step``).
        With ``settings.patience`` > 0 the search ends (completed, ``stopped_early``) at the validation that makes
        ``patience`` validations in a row without a new best: with ``select: best`` it returns what it would have
        returned after all steps whenever no later validation would have beaten the best (its steps are the same
        up to the stop; the random stream does not depend on the number of steps).
        ``record_trajectory`` also keeps the probabilities of every validation (``trajectory``: quality vs cost).
        """
        cfg = self.settings
        path = self.checkpoint_file(checkpoint_dir) if checkpoint_dir is not None else None
        state = self._resume_or_start(path)
        resumed_from = int(state["step"])
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
        try:
            with torch.no_grad():
                if validate_fn is not None and state["best"] is None:
                    self._validate(state, validate_fn, record_trajectory, elapsed())
                while state["step"] < end and not state.get("stopped_early"):
                    state, entry = self._step(state, gen, losses_fn)  # state is replaced only once a step is done
                    if validate_fn is not None and ((validate_every and state["step"] % validate_every == 0)
                                                    or state["step"] == cfg.steps):
                        entry["val_loss"] = self._validate(state, validate_fn, record_trajectory, elapsed())
                        if cfg.patience and state["step"] < cfg.steps \
                                and self.stale_validations(state) >= cfg.patience:
                            state["stopped_early"] = True
                            log.info("search stops early at step %d: %d validations without a better loss than "
                                     "step %d's (search.patience)", state["step"], cfg.patience,
                                     state["best"]["step"] if state.get("best") else 0)
                    bar.update(1)
                    if entry["n_valid"]:
                        bar.set_postfix(loss=f"{entry['loss_mean']:.4f}", baseline=f"{entry['baseline']:.4f}",
                                        refresh=False)
                    if on_step is not None:
                        on_step(entry)
                    if path is not None and cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 \
                            and state["step"] < cfg.steps:
                        save(state)
        except KeyboardInterrupt:
            if path is not None:
                save(state)
            raise
        finally:
            bar.close()
        completed = state["step"] >= cfg.steps or bool(state.get("stopped_early"))
        if path is not None:
            if completed and not keep_checkpoint:
                path.unlink(missing_ok=True)
            else:
                save(state)
        best = state.get("best")
        return SearchResult(probs={n: p.clone() for n, p in state["probs"].items()}, history=list(state["history"]),
                            steps_done=state["step"], groups=self.groups, completed=completed,
                            best_probs=None if best is None else {n: p.clone() for n, p in best["probs"].items()},
                            best_step=None if best is None else best["step"],
                            validation=list(state.get("validation", [])),
                            elapsed_s=elapsed(), resumed_from=resumed_from,
                            forward_passes=int(state.get("forward_passes", 0)),
                            trajectory=list(state.get("trajectory", [])),
                            stopped_early=bool(state.get("stopped_early")))

    @staticmethod
    def stale_validations(state: dict[str, Any]) -> int:
        """How many validations in a row, the last included, have not beaten the best validated loss."""
        best = state.get("best")
        vals = state.get("validation", [])
        return len(vals) if best is None else sum(1 for v in vals if v["step"] > best["step"])

    @staticmethod
    def _validate(state: dict[str, Any], validate_fn, record: bool = False, elapsed_s: float = 0.0) -> float:
        value = float(validate_fn({n: p.clone() for n, p in state["probs"].items()}))
        state["validation"] = list(state.get("validation", [])) + [{"step": state["step"], "val_loss": value}]
        if record:
            state["trajectory"] = list(state.get("trajectory", [])) + [{
                "step": state["step"], "forward_passes": int(state.get("forward_passes", 0)), "elapsed_s": elapsed_s,
                "val_loss": value, "probs": {n: p.clone() for n, p in state["probs"].items()}}]
        best = state.get("best")
        if math.isfinite(value) and (best is None or value < best["loss"]):
            state["best"] = {"loss": value, "step": state["step"],
                             "probs": {n: p.clone() for n, p in state["probs"].items()}}
        return value

    def _step(self, state: dict[str, Any], gen: torch.Generator, losses_fn: LossesFn
              ) -> tuple[dict[str, Any], dict]:
        """One step; returns (new state, history entry); ``state`` only gains the history entry, at the very end."""
        cfg, t, probs = self.settings, state["step"], state["probs"]
        if cfg.estimator in PAIRED:  # antithetic pairs: (u < s, 1 - u < s)
            if any(self.groups[n].ordered for n in probs):
                raise ConfigError(f"estimator {cfg.estimator!r} samples independent units; ordered (widths) groups "
                                  "need estimator loo or exact")
            per_group = {n: antithetic_masks(p, cfg.samples // 2, gen) for n, p in probs.items()}
            masks = [{n: per_group[n][j] for n in probs} for j in range(cfg.samples)]
        else:
            masks = [{n: self.groups[n].sample(p, gen) for n, p in probs.items()} for _ in range(cfg.samples)]
        raw = losses_fn(masks, t)
        losses = [float(v) for v in (raw.tolist() if isinstance(raw, torch.Tensor) else raw)]
        if len(losses) != cfg.samples:
            raise PgpruneError(f"losses_fn returned {len(losses)} losses for {cfg.samples} sampled masks")
        valid = [j for j, v in enumerate(losses) if math.isfinite(v)]
        if len(valid) < cfg.samples:
            bad = [losses[j] for j in range(cfg.samples) if j not in valid]
            warnings.warn(f"search step {t}: {len(bad)}/{cfg.samples} sampled masks gave a non-finite loss {bad}; "
                          f"dropped them" + ("" if valid else " and skipped the step"), RuntimeWarning, stacklevel=3)
        factor = lr_factor(cfg.lr_schedule, t, cfg.steps, power=cfg.lr_power, gamma=cfg.lr_gamma,
                           milestones=cfg.lr_milestones)
        entry: dict[str, Any] = {"step": t, "loss_mean": None, "loss_min": None, "baseline": None, "lr": factor,
                                 "n_valid": len(valid)}
        new = dict(state, step=t + 1, generator=gen.get_state(),
                   forward_passes=int(state.get("forward_passes", 0)) + cfg.samples)
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
                if cfg.estimator in PAIRED:
                    g = disarm_gradient(p, torch.stack([m[n] for m in masks]),
                                        torch.tensor(losses, dtype=torch.float64), eps=cfg.eps)
                else:
                    m = torch.stack([masks[j][n] for j in valid])
                    spec = self.groups[n]
                    sc = prefix_score(p, m, spec.segments, eps=cfg.eps) if spec.ordered else \
                        score(p, m, estimator=cfg.estimator, eps=cfg.eps)
                    g = w @ sc
                g = g + penalty_gradient(p, pen, estimator=cfg.estimator, eps=cfg.eps)
                stepped = p.to(torch.float64) - self.groups[n].lr * factor * g
                new_probs[n] = self.groups[n].project(stepped).to(p.dtype)
            new["nan_streak"] = 0
            entry.update(loss_mean=float(vl.mean()), loss_min=float(vl.min()), baseline=float(b))
        for n, p in new_probs.items():
            entry.update({f"{n}/lr": self.groups[n].lr * factor, f"{n}/prob_sum": float(p.sum(dtype=torch.float64)),
                          f"{n}/prob_mean": float(p.mean(dtype=torch.float64)), f"{n}/entropy": _entropy(p)})
        new["probs"] = new_probs
        new["history"] = state["history"]
        new["history"].append(entry)  # last, after everything that can fail (shared list: no O(T^2) copies)
        return new, entry
