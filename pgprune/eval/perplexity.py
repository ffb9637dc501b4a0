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


def perplexity(model: ModelLike, blocks: torch.Tensor, *, batch_size: int = 8, device: str | torch.device | None = None,
               progress: bool = False) -> dict[str, float | int]:
    """Perplexity of ``model`` on token ``blocks`` ``[n, T]`` (paper protocol: CE over positions 1..T-1 of each block).

    ``model`` is an HF causal LM or a callable ``fn(input_ids) -> logits``. ``device`` defaults to the model's
    device (CPU for a callable without parameters). A batch whose NLL is NaN/inf is dropped with a warning; if all
    are, :class:`NaNLossError` is raised. Returns ``{"ppl", "nll", "tokens", "blocks", "dropped_batches",
    "dropped_blocks"}`` where ``nll`` is the token-mean NLL in nats and ``tokens`` the number of predicted tokens.
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
    dev = torch.device(device) if device is not None else (_model_device(model) or blocks.device)

    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    total, tokens, kept_blocks, dropped_batches, dropped_blocks = 0.0, 0, 0, 0, 0
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch")
    try:
        with torch.inference_mode():
            for s in starts:
                ids = blocks[s: s + batch_size].to(dev, dtype=torch.long)
                nll = block_nll_sum(forward_logits(model, ids), ids)
                batch_sum = float(nll.double().sum())
                if not math.isfinite(batch_sum):
                    dropped_batches += 1
                    dropped_blocks += ids.shape[0]
                    continue
                total += batch_sum
                tokens += ids.shape[0] * (t - 1)
                kept_blocks += ids.shape[0]
    finally:
        if was_training:
            model.train()
    if tokens == 0:
        raise NaNLossError(f"every batch gave a NaN/inf loss ({dropped_batches} batches, {n} blocks of {t} tokens); "
                           f"no perplexity can be computed")
    if dropped_batches:
        warnings.warn(f"perplexity: dropped {dropped_batches} batch(es) ({dropped_blocks} of {n} blocks) with "
                      f"NaN/inf loss", RuntimeWarning, stacklevel=2)
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
