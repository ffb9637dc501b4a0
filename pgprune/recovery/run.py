"""A recovery run end to end: training blocks from a named corpus or text file (the calibration split, never the
held-out one), the teacher, :func:`pgprune.recovery.lora.recover_model`, optional perplexity before and after, and
the recovered folder. `pgprune recover`, `pgprune prune --recover-steps` and :func:`pgprune.api.recover` end here."""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pgprune.data.blocks import recut_blocks
from pgprune.errors import PgpruneError
from pgprune.recovery.folder import check_model_folder, teacher_source, write_recovered
from pgprune.recovery.lora import Recovered, recover_model
from pgprune.recovery.settings import RecoverSettings

if TYPE_CHECKING:
    from pgprune.config import Params

log = logging.getLogger("pgprune")


def training_blocks(source: Any, tokenizer, params: Params, settings: RecoverSettings) -> tuple[torch.Tensor, str]:
    """([n, settings.seq_len] token blocks, description) to train on: a corpus name (its calibration split:
    wikitext2/c4/ptb train, the local corpus's calibration documents), a text file, a text, or a LongTensor of
    blocks. The first ``max_blocks`` consecutive blocks are taken."""
    from pgprune.data import tokenize_blocks
    from pgprune.data.sources import named_text

    if isinstance(source, torch.Tensor):
        if source.dtype != torch.long or source.ndim != 2:
            raise PgpruneError(f"training blocks must be a LongTensor [n, seq_len], got {source.dtype} "
                               f"{tuple(source.shape)}")
        return source[: settings.max_blocks], f"{min(len(source), settings.max_blocks)} given blocks"
    if source is None:
        source = params.data.calibration
    if _is_name(str(source)):
        text, desc = named_text(str(source), params, "calibration")
    else:
        text, desc = str(source), "the given text"
    blocks = tokenize_blocks(text, tokenizer, settings.seq_len, max_blocks=settings.max_blocks,
                             source=f"recovery data {desc}", setting="seq_len")
    return blocks, f"{desc}: {blocks.shape[0]} blocks of {blocks.shape[1]} tokens"


def _is_name(source: str) -> bool:
    """A corpus name or a file name (else a text)."""
    from pgprune.data.sources import CALIBRATION_SOURCES, is_text_file_name

    if source in CALIBRATION_SOURCES or is_text_file_name(source):
        return True
    try:
        return "\n" not in source and len(source) < 1024 and Path(source).exists()
    except (OSError, ValueError):
        return False


def _ppl(model, tokenizer, corpora, params: Params) -> dict[str, float]:
    from pgprune.data.sources import eval_blocks
    from pgprune.eval.perplexity import perplexity

    out = {}
    for c in corpora or ():
        blocks, _ = eval_blocks(c, tokenizer, params)
        out[c] = perplexity(model, blocks, batch_size=params.eval.ppl_batch_size, progress=False)["ppl"]
    return out


def _teacher(teacher, folder: str | Path | None, base_model: str | None, params: Params, settings: RecoverSettings):
    """(teacher model or None, its name) for the settings' loss: a model as given, else a source (a given name,
    the folder's recorded base model, a PruneResult's base model; the embedded model from its converted folder)
    loaded with the params' model section (offload streams it layer by
    layer)."""
    if settings.loss != "kd":
        return None, None
    if isinstance(teacher, torch.nn.Module):
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher.eval(), getattr(teacher.config, "_name_or_path", None) or type(teacher).__name__
    if teacher is None and folder is not None:
        teacher = teacher_source(folder, None)
    teacher = teacher or base_model
    if not teacher:
        raise PgpruneError("loss 'kd' needs the dense teacher and none is known; allowed: teacher=<model or "
                           "source>, or loss='lm'")
    from pgprune.hf.embedded import model_folder
    from pgprune.hf.loading import load_weights

    m = params.model
    src = model_folder(str(teacher))
    model = load_weights(src, m.dtype, m.device, offload=m.offload, device_map=m.device_map, max_memory=m.max_memory)
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("recovery: teacher %s", teacher)
    return model.eval(), str(teacher)


def recover_folder(folder: str | Path, out_dir: str | Path, params: Params, settings: RecoverSettings, *,
                   data=None, teacher: str | None = None, eval_ppl=None, checkpoint_dir: str | Path | None = None,
                   progress: bool = True) -> tuple[Path, Recovered]:
    """Recover the model saved in ``folder`` and write it to ``out_dir`` in the same layout (the folder's files
    with merged weights, a Recovery section in its card, recovery.json). ``eval_ppl``: corpora measured before
    and after (recorded in the card)."""
    from transformers import AutoTokenizer

    from pgprune.hf.loading import trust_remote_code
    from pgprune.hf.slicing import load_pruned

    folder = check_model_folder(folder)
    if settings.loss == "kd" and not isinstance(teacher, torch.nn.Module):
        teacher = teacher_source(folder, teacher)  # fails before any weight is loaded
    student = load_pruned(folder, dtype=_dtype(params.model.dtype), device=params.model.device)
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code(folder))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    t_model, t_name = _teacher(teacher, folder, None, params, settings)
    blocks, desc = training_blocks(data, tok, params, settings)
    before = _ppl(student, tok, eval_ppl, params)
    rec = recover_model(student, blocks, settings, teacher=t_model, teacher_id=t_name, checkpoint_dir=checkpoint_dir,
                        progress=progress)
    after = _ppl(rec.model, tok, eval_ppl, params)
    rec.info["data"] = desc
    if before:
        rec.info["evaluation"] = {c: (before[c], after[c]) for c in before}
    path = write_recovered(rec.model, folder, out_dir, tokenizer=tok, info=rec.info, data=desc)
    return path, rec


def recover_result(result, params: Params, settings: RecoverSettings, *, data=None, teacher=None,
                   checkpoint_dir: str | Path | None = None, progress: bool = True, inplace: bool = False
                   ) -> tuple[Recovered, str]:
    """Recover a :class:`pgprune.api.PruneResult`'s model (a copy, unless ``inplace``); returns (the
    :class:`~pgprune.recovery.lora.Recovered` run, a description of its data)."""
    student = result.model if inplace else copy.deepcopy(result.model)
    for p in student.parameters():
        p.requires_grad_(False)
    t_model, t_name = _teacher(teacher, None, result.info.get("base_model"), params, settings)
    blocks, desc = training_blocks(data, result.tokenizer, params, settings)
    rec = recover_model(student, blocks, settings, teacher=t_model, teacher_id=t_name, checkpoint_dir=checkpoint_dir,
                        progress=progress)
    return rec, desc


def recover_masks(model, masks_dir: str | Path, calib: torch.Tensor, params: Params, *,
                  curve_blocks: torch.Tensor | None = None, checkpoint_dir: str | Path | None = None,
                  progress: bool = True, teacher_cache=None) -> tuple[Any, dict | None, Recovered, list[dict]]:
    """The pipeline's recovery of one masks cell (stage ``recover@<method>-<S>``).

    The masks of ``masks_dir`` are sliced out of ``model`` (the base model, left untouched; it is also the ``kd``
    teacher) with their compensation (a refit recipe is refit on ``calib``, as the evaluation does), then trained
    with ``params.recover``'s settings on ``calib`` [n, T] (the calibration blocks, never held-out text; re-cut to
    recover.seq_len when it differs from T). ``curve_blocks`` [m, T']: held-out blocks whose perplexity is measured
    before the first step, every ``recover.curve_every`` steps and after the last. Returns (masks, extra_bias of
    the compensation, the :class:`~pgprune.recovery.lora.Recovered` run with the merged model, the curve
    ``[{"step", "ppl"}]``). ``teacher_cache``: the teacher's top-k of these training blocks (the `teacher` stage's,
    :class:`~pgprune.recovery.teacher.TeacherTopK`) when recover.teacher_topk > 0; computed here when None."""
    from pgprune.core.adapters import get_adapter
    from pgprune.core.compensation import compensated_source
    from pgprune.core.handoff import load_masks, load_recipe
    from pgprune.eval.perplexity import perplexity
    from pgprune.hf.export import build_model

    settings = params.recover.settings()
    masks, extra = load_masks(masks_dir, get_adapter(model).layout())
    recipe = load_recipe(masks_dir)
    src, extra = compensated_source(model, masks, extra, recipe, calib)
    student = build_model(src, masks, extra, layout="auto").to(next(model.parameters()).device)
    del src
    for p in student.parameters():
        p.requires_grad_(False)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    blocks = recut_blocks(calib, settings.seq_len, settings.max_blocks)
    curve: list[dict] = []
    bs = params.eval.ppl_batch_size

    def measure(step: int, m) -> None:
        if curve_blocks is not None:
            curve.append({"step": step, "ppl": perplexity(m, curve_blocks, batch_size=bs)["ppl"]})

    every = params.recover.curve_every
    measure(0, student)
    rec = recover_model(student, blocks, settings, teacher=model, teacher_id=params.model.source,
                        checkpoint_dir=checkpoint_dir, progress=progress, teacher_cache=teacher_cache,
                        callback=(lambda step, m: measure(step, m) if step % every == 0 and step < settings.steps
                                  else None) if every and curve_blocks is not None else None)
    measure(settings.steps, rec.model)
    rec.info["data"] = f"the calibration blocks ({blocks.shape[0]} of {blocks.shape[1]} tokens)"
    return masks, extra, rec, curve


def _dtype(name: str) -> torch.dtype:
    from pgprune.hf.loading import torch_dtype

    return torch_dtype(name)


__all__ = ["training_blocks", "recover_folder", "recover_result", "recover_masks"]
