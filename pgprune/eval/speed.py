"""Wall-clock speed: greedy generation (tokens/s, latency) and forward-pass throughput, on random token prompts."""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from pgprune.errors import PgpruneError


def _device_of(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _vocab_size(model: torch.nn.Module, tokenizer_or_vocab: Any) -> int:
    if isinstance(tokenizer_or_vocab, int) and not isinstance(tokenizer_or_vocab, bool):
        vocab = tokenizer_or_vocab
    elif tokenizer_or_vocab is not None and hasattr(tokenizer_or_vocab, "__len__"):
        vocab = len(tokenizer_or_vocab)
    else:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if model_vocab is not None and vocab is not None:
        vocab = min(vocab, model_vocab)
    if not vocab or vocab < 2:
        raise PgpruneError(f"cannot tell the vocabulary size from {type(tokenizer_or_vocab).__name__}; "
                           f"pass a tokenizer or an int >= 2")
    return int(vocab)


def _random_ids(vocab: int, batch: int, length: int, seed: int, special: set[int]) -> torch.Tensor:
    """Seeded random ids in ``[0, vocab)`` avoiding ``special`` ones (BOS/EOS/PAD/UNK)."""
    allowed = torch.tensor([i for i in range(vocab) if i not in special] or list(range(vocab)), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(0, len(allowed), (batch, length), generator=gen)]


def _special_ids(tokenizer_or_vocab: Any, model: torch.nn.Module) -> set[int]:
    ids: set[int] = set()
    for src in (tokenizer_or_vocab, getattr(model, "config", None)):
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            v = getattr(src, attr, None) if src is not None and not isinstance(src, int) else None
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)
    return ids


def _check_pos(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PgpruneError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _summary(times: list[float], tokens: int) -> dict[str, Any]:
    mean, median = statistics.fmean(times), statistics.median(times)
    # tokens_per_s uses the median latency: robust to a repeat slowed by other work on the machine
    return {"tokens_per_s": tokens / median, "tokens_per_s_mean": tokens / mean, "latency_s": mean,
            "latency_median_s": median,
            "latency_min_s": min(times), "latency_std_s": statistics.pstdev(times) if len(times) > 1 else 0.0,
            "latencies_s": list(times)}


def generation_speed(model: torch.nn.Module, tokenizer_or_vocab: Any = None, *, batch_size: int = 1,
                     prompt_len: int = 64, new_tokens: int = 64, repeats: int = 3, warmup: int = 1,
                     device: str | torch.device | None = None, seed: int = 0,
                     progress: bool = False) -> dict[str, Any]:
    """Time greedy ``model.generate`` of exactly ``new_tokens`` tokens (``min_new_tokens=max_new_tokens``).

    Prompts are random non-special token ids. ``tokens_per_s`` counts generated tokens of the whole batch per
    second of median latency over ``repeats`` (prefill included; ``tokens_per_s_mean``: of the mean);
    ``per_token_ms`` is the mean latency per generation step.
    """
    for name, val, lo in (("batch_size", batch_size, 1), ("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 1),
                          ("repeats", repeats, 1), ("warmup", warmup, 0)):
        _check_pos(name, val, lo)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and prompt_len + new_tokens > max_pos:
        raise PgpruneError(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the model's "
                           f"max_position_embeddings = {max_pos}")
    if not hasattr(model, "generate"):
        raise PgpruneError(f"{type(model).__name__} has no .generate(); pass an HF causal LM")
    dev = _device_of(model, device)
    model.to(dev)
    vocab = _vocab_size(model, tokenizer_or_vocab)
    special = _special_ids(tokenizer_or_vocab, model)
    ids = _random_ids(vocab, batch_size, prompt_len, seed, special).to(dev)
    mask = torch.ones_like(ids)
    cfg = getattr(model, "config", None)
    eos = getattr(cfg, "eos_token_id", None)
    pad = getattr(cfg, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if isinstance(eos, (list, tuple)) else eos)
    gen_kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      num_beams=1, use_cache=True, pad_token_id=pad)
    if eos is not None:
        gen_kwargs["eos_token_id"] = eos
    was_training = model.training
    model.eval()
    times: list[float] = []
    produced = 0
    loop = range(warmup + repeats)
    if progress:
        from tqdm.auto import tqdm

        loop = tqdm(loop, desc="generation speed", unit="run")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        with torch.inference_mode():
            for i in loop:
                _sync(dev)
                t0 = time.perf_counter()
                out = model.generate(ids, **gen_kwargs)
                _sync(dev)
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times.append(dt)
                    produced = int(out.shape[1] - prompt_len)
    finally:
        if was_training:
            model.train()
    if produced != new_tokens:
        raise PgpruneError(f"generate produced {produced} new tokens instead of {new_tokens}")
    res = _summary(times, batch_size * new_tokens)
    res.update({"per_token_ms": 1000.0 * res["latency_s"] / new_tokens, "batch_size": batch_size,
                "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
                "device": str(dev), "dtype": str(next(model.parameters()).dtype).replace("torch.", "")})
    if dev.type == "cuda":
        res["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(dev))
    return res


def forward_throughput(model: torch.nn.Module, batch: int = 8, seq_len: int = 128, repeats: int = 3, *,
                       warmup: int = 1, vocab_size: int | None = None, device: str | torch.device | None = None,
                       seed: int = 0) -> dict[str, Any]:
    """Tokens per second of one forward pass over a random ``[batch, seq_len]`` input (no KV cache)."""
    for name, val, lo in (("batch", batch, 1), ("seq_len", seq_len, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        _check_pos(name, val, lo)
    dev = _device_of(model, device)
    model.to(dev)
    vocab = _vocab_size(model, vocab_size)
    ids = _random_ids(vocab, batch, seq_len, seed, set()).to(dev)
    was_training = model.training
    model.eval()
    times: list[float] = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                _sync(dev)
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=False) if hasattr(model, "config") else model(ids)
                _sync(dev)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        if was_training:
            model.train()
    res = _summary(times, batch * seq_len)
    res.update({"batch": batch, "seq_len": seq_len, "repeats": repeats, "warmup": warmup, "device": str(dev)})
    if dev.type == "cuda":
        res["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(dev))
    return res
