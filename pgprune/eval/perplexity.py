"""Perplexity with the paper's protocol (method-notes §3.1).

Non-overlapping blocks (no context carried over); in each block the cross-entropy over positions 1..T-1 (the first
token is never predicted); the token mean of the NLL over all blocks; ppl = exp(mean). Log-softmax runs in float32.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Union

import torch
import torch.nn.functional as F

from pgprune.errors import NaNLossError, PgpruneError

ModelLike = Union[torch.nn.Module, Callable[[torch.Tensor], Any]]


def _is_hf_model(model: Any) -> bool:
    return isinstance(model, torch.nn.Module) and hasattr(model, "config")


def _model_device(model: Any) -> torch.device | None:
    if isinstance(model, torch.nn.Module):
        try:
            return next(model.parameters()).device
        except StopIteration:
            return None
    return None


def _as_logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise PgpruneError(f"model returned {type(out).__name__}; expected logits (a tensor or an object with .logits)")


def forward_logits(model: ModelLike, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, T, V]`` of an HF causal LM (``model(input_ids=...).logits``) or of a callable ``fn(ids)``."""
    out = model(input_ids=input_ids) if _is_hf_model(model) else model(input_ids)
    return _as_logits(out)


def block_nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-block sum of the NLL of tokens 1..T-1 given their prefix, in float32; returns ``[b]``."""
    b, t = input_ids.shape
    if logits.dim() != 3 or logits.shape[0] != b or logits.shape[1] != t:
        raise PgpruneError(f"logits have shape {tuple(logits.shape)}; expected [{b}, {t}, vocab] for input {b}x{t}")
    pred = logits[:, :-1, :].float()
    target = input_ids[:, 1:].to(pred.device)
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(b, t - 1).sum(dim=1)


def _executor(model: Any, masks: Any):
    """A MaskedModel when the model must run layer by layer (streamed / spread over devices) or masks are given."""
    from pgprune.core.masked_forward import MaskedModel

    if isinstance(model, MaskedModel):
        return model
    if _is_hf_model(model):
        from pgprune.core.weights import is_streamed

        if masks is not None or is_streamed(model):
            return MaskedModel(model)
    elif masks is not None:
        raise PgpruneError("masks need a Hugging Face model or a MaskedModel, not a callable")
    return None


def perplexity(model: ModelLike, blocks: torch.Tensor, *, batch_size: int = 8, device: str | torch.device | None = None,
               progress: bool = False, masks: Any = None, sweep_blocks: int | None = None) -> dict[str, float | int]:
    """Perplexity of ``model`` on token ``blocks`` ``[n, T]`` (paper protocol: CE over positions 1..T-1 of each block).

    ``model`` is an HF causal LM, a callable ``fn(input_ids) -> logits`` or a
    :class:`pgprune.core.masked_forward.MaskedModel`. ``device`` defaults to the model's device (CPU for a callable
    without parameters). A model loaded with offload/device_map (``pgprune.core.weights.is_streamed``), a MaskedModel,
    or ``masks`` (evaluated with the masked forward, i.e. the sliced model without slicing it) run through the
    layer-major executor: every block of a sweep (``sweep_blocks``, default all) passes through a layer before the
    next is loaded. A batch whose NLL is NaN/inf is dropped with a warning; if all are, :class:`NaNLossError` is
    raised. Returns ``{"ppl", "nll", "tokens", "blocks", "dropped_batches", "dropped_blocks"}`` where ``nll`` is the
    token-mean NLL in nats and ``tokens`` the number of predicted tokens.
    """
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2:
        shape = tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise PgpruneError(f"blocks must be a 2-D LongTensor [n, T], got {shape}")
    if blocks.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
        raise PgpruneError(f"blocks must hold token ids (integer dtype), got {blocks.dtype}")
    n, t = blocks.shape
    if n < 1 or t < 2:
        raise PgpruneError(f"blocks must be [n>=1, T>=2], got [{n}, {t}]")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PgpruneError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    executor = _executor(model, masks)
    if executor is not None:
        nll = executor.block_nll(blocks.long(), masks, batch_size=batch_size, sweep_blocks=sweep_blocks,
                                 progress=progress)  # float64 [n]
        sums = [(float(nll[s:s + batch_size].sum()), min(batch_size, n - s)) for s in range(0, n, batch_size)]
        return _reduce(sums, n, t)
    dev = torch.device(device) if device is not None else (_model_device(model) or blocks.device)

    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    sums = []
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch")
    try:
        with torch.inference_mode():
            for s in starts:
                ids = blocks[s: s + batch_size].to(dev, dtype=torch.long)
                nll = block_nll_sum(forward_logits(model, ids), ids)
                sums.append((float(nll.double().sum()), ids.shape[0]))
    finally:
        if was_training:
            model.train()
    return _reduce(sums, n, t)


def _reduce(sums: list[tuple[float, int]], n: int, t: int) -> dict[str, float | int]:
    """Token-mean NLL and perplexity from per-batch (NLL sum, blocks); non-finite batches are dropped."""
    total, tokens, kept_blocks, dropped_batches, dropped_blocks = 0.0, 0, 0, 0, 0
    for batch_sum, nb in sums:
        if not math.isfinite(batch_sum):
            dropped_batches += 1
            dropped_blocks += nb
            continue
        total += batch_sum
        tokens += nb * (t - 1)
        kept_blocks += nb
    if tokens == 0:
        raise NaNLossError(f"every batch gave a NaN/inf loss ({dropped_batches} batches, {n} blocks of {t} tokens); "
                           f"no perplexity can be computed")
    if dropped_batches:
        warnings.warn(f"perplexity: dropped {dropped_batches} batch(es) ({dropped_blocks} of {n} blocks) with "
                      f"NaN/inf loss", RuntimeWarning, stacklevel=3)
    mean = total / tokens
    return {"ppl": math.exp(mean) if mean < 709.0 else float("inf"), "nll": mean, "tokens": tokens,
            "blocks": kept_blocks, "dropped_batches": dropped_batches, "dropped_blocks": dropped_blocks}


def text_perplexity(model: ModelLike, tokenizer: Any, text: str, *, seq_len: int = 128, batch_size: int = 8,
                    max_blocks: int | None = None, device: str | torch.device | None = None,
                    progress: bool = False) -> dict[str, float | int]:
    """Tokenize ``text`` into non-overlapping ``seq_len`` blocks (BOS at the start) and return :func:`perplexity`."""
    from pgprune.data.blocks import tokenize_blocks

    blocks = tokenize_blocks(text, tokenizer, seq_len, max_blocks=max_blocks)
    out = perplexity(model, blocks, batch_size=batch_size, device=device, progress=progress)
    out["seq_len"] = seq_len
    return out
