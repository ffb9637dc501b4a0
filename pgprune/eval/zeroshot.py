"""Zero-shot accuracy through lm-evaluation-harness on an in-memory model (method-notes §3.2).

The model object is wrapped in ``HFLM(pretrained=model, tokenizer=tokenizer)``: no save/reload, so pruned models
with per-layer widths work. Local tasks (see :mod:`pgprune.data.local_tasks`) come in through ``include_path``; the
paper's tasks (boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa) stay usable by name but need
their datasets in the local HF cache when offline. ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` are honoured even if
they were set after ``datasets`` was imported.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
from typing import Any, Sequence

import torch

from pgprune.errors import PgpruneError

log = logging.getLogger(__name__)

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def _task_manager(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None, tasks: Sequence[str],
                  include_defaults: bool | None):
    """A TaskManager and the task names found under ``include_path``.

    Indexing lm-eval's ~15k built-in task names takes seconds, so with ``include_defaults=None`` the built-ins are
    only indexed when some requested task is not found under ``include_path``.
    """
    from lm_eval.tasks import TaskManager

    paths = [] if include_path is None else (
        [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path))
    for p in paths:
        if not os.path.isdir(p):
            raise PgpruneError(f"include_path '{os.fspath(p)}' is not a directory of task YAMLs")
    abs_paths = [os.path.abspath(os.fspath(p)) for p in paths]
    local: list[str] = []
    if abs_paths:
        tm = TaskManager(include_path=abs_paths, include_defaults=False)
        local = sorted(tm.all_tasks)
        if include_defaults is False or (include_defaults is None and all(t in local for t in tasks)):
            return tm, local
    elif include_defaults is False:
        raise PgpruneError("include_defaults=False needs an include_path with task YAMLs")
    return TaskManager(include_path=abs_paths or None), local


def _check_tasks(tasks: Sequence[str], tm: Any, local: list[str]) -> None:
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if not unknown:
        return
    parts = []
    for t in unknown:
        close = difflib.get_close_matches(t, list(known), n=5, cutoff=0.6)
        parts.append(f"'{t}'" + (f" (close: {', '.join(close)})" if close else ""))
    raise PgpruneError(
        f"unknown zero-shot task(s): {'; '.join(parts)}. Tasks found in include_path: "
        f"{', '.join(local) if local else '(none)'}; "
        + (f"lm-eval built-ins include {', '.join(PAPER_TASKS)} ({len(known)} names registered in all)"
           if len(known) > len(local) else "lm-eval built-ins were not searched (include_defaults=False)"))


class _DropLoaderNotice(logging.Filter):
    """Hide lm-eval's notice about metadata kwargs, printed for every task with a ``custom_dataset`` loader."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _metrics(res: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": x, "acc_stderr,none": s}`` -> ``{"acc": x, "acc_stderr": s}`` (the 'none' filter wins)."""
    out: dict[str, float] = {}
    for key, val in res.items():
        if "," not in key:
            continue
        metric, flt = key.split(",", 1)
        if metric in out and flt != "none":
            continue
        if val == "N/A":
            val = float("nan")
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            continue
        out[metric] = float(val)
    return out


def zero_shot(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], *,
              include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None, batch_size: int = 8,
              limit: int | float | None = None, device: str | torch.device | None = "cpu", num_fewshot: int = 0,
              metric: str = "acc", fallback_metric: str | None = "acc", offline: bool | None = None,
              max_length: int | None = None, seed: int = 0, include_defaults: bool | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on lm-eval ``tasks`` and return per-task metrics plus their average.

    ``model`` is moved to ``device`` (``None`` keeps it where it is). ``metric`` is averaged over tasks; a task
    without it contributes ``fallback_metric`` instead (e.g. ``metric="acc_norm"`` uses acc for boolq/winogrande,
    as LLM-Pruner's tables do) and ``metric_used`` records which one each task gave. ``offline=True`` forces
    offline mode, ``None`` follows the environment. ``include_defaults`` (``None``: only when needed) says whether
    lm-eval's built-in tasks are indexed besides ``include_path``. Returns::

        {"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr" (when present), "stderr",
                          "metric_used"}},
         "average": float, "metric": metric, "metric_used": {name: metric}, "num_fewshot", "limit", "n_samples"}
    """
    if isinstance(tasks, str) or not tasks:
        raise PgpruneError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    tasks = list(dict.fromkeys(tasks))
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PgpruneError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if num_fewshot < 0:
        raise PgpruneError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and limit <= 0:
        raise PgpruneError(f"limit must be positive or None, got {limit}")

    from pgprune.data.hub import hf_offline

    with hf_offline(offline):
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        tm, local = _task_manager(include_path, tasks, include_defaults)
        _check_tasks(tasks, tm, local)
        if device is not None:
            model = model.to(device)
        was_training = model.training
        model.eval()
        kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size}
        if max_length is not None:
            kwargs["max_length"] = max_length
        task_log = logging.getLogger("lm_eval.api.task")
        notice_filter = _DropLoaderNotice()
        task_log.addFilter(notice_filter)
        try:
            lm = HFLM(**kwargs)
            out = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=tm, log_samples=False,
                bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed)
        finally:
            task_log.removeFilter(notice_filter)
            if was_training:
                model.train()
    if out is None:  # non-zero rank under accelerate
        raise PgpruneError("lm-eval returned no results (not the main process?)")

    results = out.get("results", {})
    per_task: dict[str, dict[str, Any]] = {}
    used: dict[str, str] = {}
    values: list[float] = []
    for t in tasks:
        if t not in results:
            raise PgpruneError(f"lm-eval gave no result for task '{t}'; it returned: {', '.join(results)}")
        m = _metrics(results[t])
        chosen = metric if metric in m else (fallback_metric if fallback_metric in m else None)
        if chosen is None:
            raise PgpruneError(f"task '{t}' reports no '{metric}'"
                               + (f" nor '{fallback_metric}'" if fallback_metric else "")
                               + f"; it has: {', '.join(sorted(m))}")
        entry = {k: v for k, v in m.items() if k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
                 or k == chosen or k == f"{chosen}_stderr"}
        entry["stderr"] = m.get(f"{chosen}_stderr", float("nan"))
        entry["metric_used"] = chosen
        per_task[t] = entry
        used[t] = chosen
        values.append(m[chosen])
    average = sum(values) / len(values)
    if any(c != metric for c in used.values()):
        log.warning("zero-shot average of '%s' used '%s' for: %s", metric, fallback_metric,
                    ", ".join(t for t, c in used.items() if c != metric))
    n_samples = {t: v.get("effective", v.get("original")) for t, v in (out.get("n-samples") or {}).items()}
    return {"tasks": per_task, "average": average if math.isfinite(average) else float("nan"), "metric": metric,
            "metric_used": used, "num_fewshot": num_fewshot, "limit": limit, "n_samples": n_samples}
