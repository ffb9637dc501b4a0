"""LoRA recovery of a pruned model: adapters (peft) on its projections, trained on text blocks with next-token
loss or distillation from the dense model, then merged into the weights.

Maths. Every target projection ``W [out, in]`` becomes ``W + (alpha/r) · B A`` with ``A [r, in]`` (Kaiming-uniform)
and ``B [out, r] = 0`` at the start, so step 0 is the pruned model exactly; only A and B are trained (AdamW,
warm-up then cosine/linear/constant schedule, gradient clipping). Losses per token t of a block:

* ``lm``: ``-log p_s(x_{t+1} | x_{<=t})`` (the pruned model's own next-token cross-entropy);
* ``kd``: ``T² · KL(p_t^T || p_s^T)`` with ``p^T = softmax(logits / T)`` of the dense teacher and the student
  (Hinton et al.; Minitron-style logit distillation). A teacher equal to the student gives exactly 0. With
  ``teacher_topk`` k > 0 the teacher's distribution is its top-k tokens plus "the rest" as one event, cached once
  per block before the first step (:mod:`pgprune.recovery.teacher`).

Difference from LLM-Pruner's recovery (the paper this follows): LLM-Pruner tunes LoRA on ~50k Alpaca instructions
for 2 epochs with the LM loss; here the data is plain text (the calibration corpus or any text file, never the
held-out split), a few hundred steps, and distillation from the dense model is the default, since a pruned model
recovers more per token from its teacher's full distribution than from one-hot labels.

Determinism: the adapters' initialisation, the data order (a permutation per epoch from ``seed``) and dropout (re-
seeded per micro-batch from ``seed`` and the step) depend only on the settings, so a run resumed from a checkpoint
(adapters, optimiser and scheduler state) gives the same merged bytes on CPU as an uninterrupted one. A checkpoint
is keyed by a digest of the model's weights, the blocks, the settings and the teacher: it serves only that run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pgprune.errors import PgpruneError
from pgprune.io import atomic_path, tensor_digest
from pgprune.recovery.settings import RecoverSettings
from pgprune.recovery.teacher import kd_topk_loss, logits_of, teacher_topk

log = logging.getLogger("pgprune")
CHECKPOINT_VERSION = 1


@dataclass
class Recovered:
    """What :func:`recover_model` returns: the merged model (a plain transformers model again, same class and
    shapes as the input) and what happened (``info``: settings, steps, losses per step, tokens, time)."""

    model: torch.nn.Module
    info: dict = field(default_factory=dict)


# --- digests ---------------------------------------------------------------------------------------------------
def run_key(model, blocks: torch.Tensor, settings: RecoverSettings, teacher_id: str | None,
            bf16_teacher: bool = False) -> str:
    """The key a checkpoint must match: the student's weights, the training blocks, the settings, the teacher
    (None for the lm loss) and whether its forward runs in bfloat16 (teacher_autocast resolved on this device)."""
    h = hashlib.sha256()
    h.update(tensor_digest(model.state_dict()).encode())
    h.update(tensor_digest([blocks]).encode())
    h.update(json.dumps(settings.model_dump(mode="json"), sort_keys=True).encode())
    h.update(f"teacher_bf16={bool(bf16_teacher)}".encode())
    h.update(str(teacher_id if settings.loss == "kd" else None).encode())
    h.update(str(CHECKPOINT_VERSION).encode())
    return h.hexdigest()


# --- adapters --------------------------------------------------------------------------------------------------
def target_names(model, kinds) -> list[str]:
    """Full names of the Linear modules whose last name part is in ``kinds`` and that have inputs and outputs
    (a layer that keeps no head has a 0-wide o_proj: no adapter)."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in kinds
             and m.in_features > 0 and m.out_features > 0]
    if not names:
        raise PgpruneError(f"the model has no Linear module named {', '.join(kinds)}; allowed: a LLaMA-family "
                           "model (q/k/v/o_proj, gate/up/down_proj)")
    return names


def add_adapters(model, settings: RecoverSettings):
    """The model wrapped by peft with LoRA adapters on the target projections (initialised from ``seed``)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                     target_modules=target_names(model, settings.target_modules), task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        peft_model = get_peft_model(model, cfg)
    return peft_model


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing or len(state) != sum(p.requires_grad for p in params.values()):
        raise PgpruneError("the recovery checkpoint's adapters do not match the model's (" + (
            f"unknown: {missing[:3]}" if missing else "a different number of adapters") + ")")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


# --- schedule and data -----------------------------------------------------------------------------------------
def lr_factor(step: int, settings: RecoverSettings) -> float:
    """Multiplier of lr at optimizer step ``step`` (0-based): linear warm-up over warmup_steps, then constant,
    linear or cosine decay to 0 at ``steps``."""
    w, n = settings.warmup_steps, settings.steps
    if step < w:
        return (step + 1) / (w + 1)
    if settings.schedule == "constant":
        return 1.0
    frac = (step - w) / max(1, n - w)
    return 1.0 - frac if settings.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))


def batch_indices(step: int, micro: int, n_blocks: int, settings: RecoverSettings) -> torch.Tensor:
    """Indices of the blocks of micro-batch ``micro`` of optimizer step ``step``: the blocks in a new seeded
    order each epoch (a function of the position only, so a resumed run reads the same blocks)."""
    bs = settings.batch_size
    start = (step * settings.grad_accum + micro) * bs
    idx = []
    for pos in range(start, start + bs):
        epoch, i = divmod(pos, n_blocks)
        perm = _perm(epoch, n_blocks, settings.seed)
        idx.append(int(perm[i]))
    return torch.tensor(idx, dtype=torch.long)


_PERMS: dict[tuple[int, int, int], torch.Tensor] = {}


def _perm(epoch: int, n: int, seed: int) -> torch.Tensor:
    key = (epoch, n, seed)
    if key not in _PERMS:
        if len(_PERMS) > 8:
            _PERMS.clear()
        _PERMS[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return _PERMS[key]


# --- losses ----------------------------------------------------------------------------------------------------
def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits [B, T, V], ids [B, T]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) || softmax(student/T)), summed over the vocabulary, mean over tokens;
    student/teacher logits [B, T, V]."""
    t = temperature
    s_log = F.log_softmax(student.float() / t, dim=-1)  # [B, T, V]
    t_log = F.log_softmax(teacher.float() / t, dim=-1)  # [B, T, V]
    kl = F.kl_div(s_log, t_log, log_target=True, reduction="none").sum(-1)  # [B, T]
    return kl.mean() * t * t


# --- checkpoints -----------------------------------------------------------------------------------------------
def checkpoint_path(checkpoint_dir: str | Path, key: str) -> Path:
    return Path(checkpoint_dir) / f"recover-{key[:20]}.pt"


def save_checkpoint(path: Path, key: str, step: int, model, optimizer, losses: list[float]) -> None:
    state = {"version": CHECKPOINT_VERSION, "key": key, "step": step, "adapters": trainable_state(model),
             "optimizer": optimizer.state_dict(), "losses": list(losses)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, key: str) -> dict | None:
    """The checkpoint at ``path`` if it was written by the run with ``key``; a damaged one or another run's is
    ignored (with a warning), never used."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged: start over rather than fail or guess
        log.warning("recovery checkpoint %s is unreadable (%s); starting from step 0", path, e)
        return None
    if not isinstance(state, dict) or state.get("key") != key or state.get("version") != CHECKPOINT_VERSION:
        log.warning("recovery checkpoint %s was written by other settings, weights or data; starting from step 0",
                    path)
        return None
    return state


# --- the loop --------------------------------------------------------------------------------------------------
def _autocast(settings: RecoverSettings, device: torch.device):
    if settings.autocast == "bfloat16" or (settings.autocast == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively (CUDA with bf16; a CPU with AMX or AVX512-BF16, where
    oneDNN's bf16 GEMMs run several times faster than float32; elsewhere bf16 is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(bool(getattr(cpu, f, lambda: False)()) for f in ("_is_amx_tile_supported",
                                                                   "_is_avx512_bf16_supported"))
    return False


def teacher_bf16(settings: RecoverSettings, device: torch.device) -> bool:
    """settings.teacher_autocast resolved on the teacher's ``device``."""
    return settings.teacher_autocast == "bfloat16" or (settings.teacher_autocast == "auto" and native_bf16(device))


def recover_model(model, blocks: torch.Tensor, settings: RecoverSettings, *, teacher=None,
                  teacher_id: str | None = None, checkpoint_dir: str | Path | None = None,
                  progress: bool = True, callback=None, teacher_cache=None) -> Recovered:
    """Train LoRA adapters on ``model`` (changed in place: pass a copy to keep it) over ``blocks`` [n, seq_len]
    with ``settings`` and return the merged model. ``teacher``: the dense model for ``loss: kd`` (a callable
    ``ids -> logits`` or a model; kept frozen, on its own device), ``teacher_id`` names it in the checkpoint key.
    ``checkpoint_dir``: checkpoints every ``checkpoint_every`` steps and on an interruption; a run with the
    same key resumes from the last one. ``callback(steps_done, model)``: called after every step with the model as
    it is then (the transformers model with peft's LoRA layers in place, unmerged; e.g. a perplexity curve), under
    no_grad in eval mode; it must leave the weights alone. ``teacher_cache``: the
    :class:`~pgprune.recovery.teacher.TeacherTopK` of these blocks (``teacher_topk`` > 0; computed here from
    ``teacher`` when not given; one made for other blocks, k or temperature is refused)."""
    topk = settings.loss == "kd" and settings.teacher_topk > 0
    if settings.loss == "kd" and teacher is None and not (topk and teacher_cache is not None):
        raise PgpruneError("loss 'kd' needs the dense teacher model; allowed: pass a teacher (or, with "
                           "teacher_topk, its cache), or loss 'lm'")
    if blocks.ndim != 2 or blocks.shape[1] < 2:
        raise PgpruneError(f"training blocks must be [n, seq_len >= 2] token ids, got {tuple(blocks.shape)}")
    if topk:
        if teacher_cache is None:  # the blocks this run visits (all of them after one epoch)
            visited = torch.cat([batch_indices(step, micro, blocks.shape[0], settings)
                                 for step in range(settings.steps) for micro in range(settings.grad_accum)])
            teacher_cache = teacher_topk(teacher, blocks, settings.teacher_topk, settings.temperature,
                                         teacher_id=teacher_id or "", batch_size=settings.batch_size,
                                         progress=progress, only=visited)
        teacher_cache.check(tensor_digest([blocks]), settings.teacher_topk, settings.temperature)
        teacher_id = teacher_id or teacher_cache.teacher
    device = next(model.parameters()).device
    t_device = next(teacher.parameters()).device if isinstance(teacher, torch.nn.Module) else device
    t_bf16 = settings.loss == "kd" and not topk and teacher_bf16(settings, t_device)
    key = run_key(model, blocks, settings, teacher_id, t_bf16)
    ckpt = checkpoint_path(checkpoint_dir, key) if checkpoint_dir is not None else None
    peft_model = add_adapters(model, settings)
    if settings.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.enable_input_require_grads()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    losses: list[float] = []
    start = 0
    state = load_checkpoint(ckpt, key) if ckpt is not None else None
    if state is not None:
        load_trainable(peft_model, state["adapters"])
        opt.load_state_dict(state["optimizer"])
        losses, start = list(state["losses"]), int(state["step"])
        log.info("recovery: resumed from %s at step %d of %d", ckpt, start, settings.steps)
    teacher_fn = teacher if (teacher is None or not isinstance(teacher, torch.nn.Module)) else (
        lambda ids: logits_of(teacher, ids.to(next(teacher.parameters()).device)))
    n = blocks.shape[0]
    peft_model.train()
    t0, tokens = time.perf_counter(), 0
    bar = tqdm(range(start, settings.steps), desc=f"recover ({settings.loss})", disable=not progress,
               initial=start, total=settings.steps, dynamic_ncols=True)
    step = start
    try:
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = settings.lr * lr_factor(step, settings)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(settings.grad_accum):
                idx = batch_indices(step, micro, n, settings)
                ids = blocks[idx].to(device)  # [B, T]
                torch.manual_seed(settings.seed * 7_919 + step * 131 + micro)  # dropout
                with _autocast(settings, device):
                    logits = logits_of(peft_model, ids)  # [B, T, V]
                    if settings.loss == "lm":
                        loss = lm_loss(logits, ids)
                    elif topk:
                        loss = kd_topk_loss(logits, *teacher_cache.batch(idx, logits.device), settings.temperature)
                    else:
                        with torch.no_grad(), (torch.autocast(t_device.type, dtype=torch.bfloat16) if t_bf16
                                               else contextlib.nullcontext()):
                            t_logits = teacher_fn(ids).to(logits.device)  # [B, T, V] (kd_loss: float32)
                        loss = kd_loss(logits, t_logits, settings.temperature)
                if not torch.isfinite(loss):
                    where = (f"the last good checkpoint is {ckpt} (step {state_step(ckpt, key)})" if ckpt is not None
                             and ckpt.exists() else "no checkpoint was written")
                    raise PgpruneError(f"recovery loss is {loss.item()} at step {step} (micro-batch {micro}); "
                                       f"{where}; allowed: a finite loss (try a lower --lr, or autocast none)")
                (loss / settings.grad_accum).backward()
                total += loss.item() / settings.grad_accum
                tokens += ids.numel()
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            opt.step()
            losses.append(total)
            if callback is not None:
                t_cb = time.perf_counter()
                peft_model.eval()
                with torch.no_grad():
                    callback(step + 1, peft_model.get_base_model())  # the model with the LoRA layers in it
                peft_model.train()
                t0 += time.perf_counter() - t_cb  # the callback's time is not the recovery's
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{tokens / max(1e-9, time.perf_counter() - t0):.0f}")
            if ckpt is not None and settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0 \
                    and step + 1 < settings.steps:
                save_checkpoint(ckpt, key, step + 1, peft_model, opt, losses)
    except KeyboardInterrupt:
        if ckpt is not None and len(losses) > start:
            save_checkpoint(ckpt, key, len(losses), peft_model, opt, losses)
            raise KeyboardInterrupt(f"recovery checkpoint at step {len(losses)}: {ckpt}") from None
        raise
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    peft_model.eval()
    merged = peft_model.merge_and_unload()
    if ckpt is not None and ckpt.exists():
        ckpt.unlink()
    info = {"settings": settings.model_dump(mode="json"), "steps": settings.steps, "resumed_from_step": start,
            "losses": losses, "tokens": tokens, "time_s": elapsed,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
            "adapters": sum(p.numel() for p in params), "blocks": n, "teacher": teacher_id,
            "teacher_topk": settings.teacher_topk if topk else None}
    return Recovered(model=merged, info=info)


def state_step(path: Path, key: str) -> int | None:
    state = load_checkpoint(path, key)
    return None if state is None else int(state["step"])


__all__ = ["Recovered", "RecoverSettings", "recover_model", "lm_loss", "kd_loss", "lr_factor", "batch_indices",
           "run_key", "target_names", "add_adapters", "checkpoint_path"]
