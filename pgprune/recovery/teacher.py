"""The dense teacher's next-token distributions cached as top-k log-probabilities (``recover.teacher_topk``), and
the distillation loss on them.

Maths. For every token position t of a training block the cache holds the teacher's k largest log-probabilities at
temperature T, ``log p_t(v)`` for v in K_t (the top-k set), their vocabulary indices, and the log of the rest of
the mass, ``log r_t = log sum_{v not in K_t} p_t(v)`` (a logsumexp over the complement, not 1 - sum: exact where the
top-k mass is close to 1). The loss is the KL divergence of the teacher's distribution *coarsened* to the k+1
events (each top-k token, and "any other token") from the student's coarsened the same way:

    T^2 * [ sum_{v in K_t} p_t(v) (log p_t(v) - log q_t(v)) + r_t (log r_t - log s_t) ],   s_t = sum_{v not in K_t} q_t(v)

with ``q = softmax(student / T)`` over the whole vocabulary. It is 0 when the student equals the teacher, never
negative (the KL of two distributions over k+1 events), equals the full KL of :func:`pgprune.recovery.lora.kd_loss`
when k is the vocabulary size, and is a lower bound of it otherwise (coarsening only loses information). It still
pushes the student's mass off every token outside the teacher's top-k, unlike a KL over the top-k renormalised.

Difference from distilling from the live teacher: the teacher runs once per training block instead of once per
block per step per recovery run, and the cache (``[n, T, k]`` float32 + int32 and ``[n, T]``) is shared by every
run on the same blocks (the pipeline's recovery cells); what is lost is the shape of the teacher's tail (the
tokens outside its top-k are matched only in total). Sparse-logit distillation with k of a few dozen is the usual
choice when teacher logits are stored (e.g. Minitron's and llm-compressor's offline distillation).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pgprune.errors import PgpruneError

CACHE_FILE = "teacher_topk.safetensors"
CACHE_VERSION = 1
META_KEY = "pgprune_teacher"  # one metadata entry (a JSON object): safetensors orders several entries arbitrarily


@dataclass
class TeacherTopK:
    """The teacher's top-k log-probabilities of ``blocks`` [n, T] at ``temperature``: ``logp`` [n, T, k] float32
    (descending), ``index`` [n, T, k] int32 (vocabulary ids), ``rest`` [n, T] float32 (log of the mass outside the
    top-k; -inf when k is the whole vocabulary). ``blocks_digest`` names the blocks, ``teacher`` the teacher."""

    logp: torch.Tensor
    index: torch.Tensor
    rest: torch.Tensor
    k: int
    temperature: float
    blocks_digest: str
    teacher: str
    rows: torch.Tensor | None = None  # [n] long: block -> row of the arrays (-1: not cached); None: row = block

    def batch(self, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logp [B, T, k], index [B, T, k] long, rest [B, T]) of the blocks ``idx`` on ``device``."""
        if self.rows is not None:
            r = self.rows[idx]
            if bool((r < 0).any()):
                raise PgpruneError(f"the teacher cache has no entry for training block(s) "
                                   f"{idx[r < 0].tolist()[:5]}; it was made for another run's steps")
            idx = r
        return (self.logp[idx].to(device), self.index[idx].to(device, torch.long), self.rest[idx].to(device))

    def check(self, blocks_digest: str, k: int, temperature: float) -> None:
        """PgpruneError unless this cache was made for these blocks, this k and this temperature."""
        bad = []
        if self.blocks_digest != blocks_digest:
            bad.append("other training blocks")
        if self.k != k:
            bad.append(f"teacher_topk={self.k} (the run asks for {k})")
        if self.temperature != temperature:
            bad.append(f"temperature={self.temperature} (the run asks for {temperature})")
        if bad:
            raise PgpruneError(f"the teacher cache was made for {', '.join(bad)}; it serves only the run it was made "
                               "for: recompute it (dvc repro teacher) or let the run compute its own")

    def save(self, folder: str | Path) -> Path:
        """Write the cache atomically to ``folder``/teacher_topk.safetensors (metadata: k, temperature, digests)."""
        from pgprune.io import save_tensors

        path = Path(folder) / CACHE_FILE
        meta = {"version": CACHE_VERSION, "k": self.k, "temperature": float(self.temperature),
                "blocks_digest": self.blocks_digest, "teacher": self.teacher}
        t = {"logp": self.logp, "index": self.index, "rest": self.rest}
        if self.rows is not None:
            t["rows"] = self.rows
        save_tensors(path, t, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "TeacherTopK":
        """The cache written by :meth:`save` (a missing, damaged or foreign file: one line naming it)."""
        from pgprune.io import load_tensors

        path = Path(folder) / CACHE_FILE
        t, header = load_tensors(path, "teacher cache (the teacher stage's: dvc repro teacher)", nested=False,
                                 metadata=True)
        try:
            meta = json.loads(header.get(META_KEY, "{}"))
        except ValueError:
            meta = {}
        if meta.get("version") != CACHE_VERSION or set(t) - {"rows"} != {"logp", "index", "rest"}:
            raise PgpruneError(f"'{path}' is not a version-{CACHE_VERSION} pgprune teacher cache (version "
                               f"{meta.get('version')}, tensors {sorted(t)}); recompute it (dvc repro teacher)")
        out = cls(t["logp"], t["index"], t["rest"], int(meta["k"]), float(meta["temperature"]),
                  meta.get("blocks_digest", ""), meta.get("teacher", ""), t.get("rows"))
        n, t_len, k = out.logp.shape
        if out.index.shape != out.logp.shape or out.rest.shape != (n, t_len) or k != out.k:
            raise PgpruneError(f"teacher cache '{path}' has inconsistent shapes {tuple(out.logp.shape)}, "
                               f"{tuple(out.index.shape)}, {tuple(out.rest.shape)}; recompute it (dvc repro teacher)")
        return out


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of a causal LM (no KV cache)."""
    out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def top_k_of(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k log-probs [.., k] float32, their indices [.., k] long, log of the rest of the mass [..]) of
    ``softmax(logits / temperature)`` over the last axis (logits [.., V]; k <= V)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # [.., V]
    top, idx = logp.topk(k, dim=-1, sorted=True)  # [.., k]
    rest = logp.scatter(-1, idx, float("-inf")).logsumexp(-1)  # [..]: -inf when k == V
    return top, idx, rest


@torch.no_grad()
def teacher_topk(teacher, blocks: torch.Tensor, k: int, temperature: float, *, teacher_id: str = "",
                 batch_size: int = 8, progress: bool = True, only: torch.Tensor | None = None) -> TeacherTopK:
    """The teacher's top-k cache of ``blocks`` [n, T] (one forward per block; with ``only``, of those block
    indices alone: the blocks a run of few steps visits). ``teacher``: a model (frozen; on its own device, streamed
    layer by layer when it was loaded with offload) or a callable ``ids -> logits``."""
    from pgprune.io import tensor_digest

    if k < 1:
        raise PgpruneError(f"teacher_topk={k}; allowed: >= 1 (0 distils from the live teacher, no cache)")
    fn = teacher if not isinstance(teacher, torch.nn.Module) else (
        lambda ids: logits_of(teacher, ids.to(next(teacher.parameters()).device)))
    rows = None
    todo = blocks
    if only is not None and len(only) < blocks.shape[0]:
        only = torch.unique(only)  # sorted
        rows = torch.full((blocks.shape[0],), -1, dtype=torch.long)
        rows[only] = torch.arange(len(only))
        todo = blocks[only]
    logps, idxs, rests = [], [], []
    starts = range(0, todo.shape[0], batch_size)
    for s in tqdm(starts, desc=f"teacher top-{k}", disable=not progress, unit="batch"):
        logits = fn(todo[s:s + batch_size])  # [b, T, V]
        if k > logits.shape[-1]:
            raise PgpruneError(f"teacher_topk={k} is larger than the vocabulary ({logits.shape[-1]}); allowed: "
                               f"1..{logits.shape[-1]}")
        top, idx, rest = top_k_of(logits, k, temperature)
        logps.append(top.cpu())
        idxs.append(idx.to(torch.int32).cpu())
        rests.append(rest.cpu())
    return TeacherTopK(torch.cat(logps), torch.cat(idxs), torch.cat(rests), int(k), float(temperature),
                       tensor_digest([blocks]), str(teacher_id or ""), rows)


def kd_topk_loss(student: torch.Tensor, logp: torch.Tensor, index: torch.Tensor, rest: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """T^2 * KL of the teacher's top-k + rest distribution from the student's (see the module docstring), mean over
    tokens. student [B, T, V] logits; logp, index [B, T, k] and rest [B, T] from the cache."""
    t = temperature
    s_log = F.log_softmax(student.float() / t, dim=-1)  # [B, T, V]
    s_top = s_log.gather(-1, index)  # [B, T, k]
    s_rest = s_log.scatter(-1, index, float("-inf")).logsumexp(-1)  # [B, T]
    top = (logp.exp() * (logp - s_top)).sum(-1)  # [B, T]
    has_rest = torch.isfinite(rest)
    tail = torch.where(has_rest, rest.exp() * (rest - torch.where(has_rest, s_rest, rest)), torch.zeros_like(rest))
    return (top + tail).mean() * t * t


__all__ = ["CACHE_FILE", "TeacherTopK", "logits_of", "top_k_of", "teacher_topk", "kd_topk_loss"]
