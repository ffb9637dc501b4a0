"""Cut a text into token blocks: non-overlapping blocks for evaluation, random windows for calibration."""
from __future__ import annotations

import logging
from typing import Any

import torch

from pgprune.errors import PgpruneError

log = logging.getLogger(__name__)


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise PgpruneError(f"seq_len must be an integer >= 2 (one token to condition on, one to predict), got {seq_len!r}")


def tokenize_stream(text: str, tokenizer: Any, *, add_bos: bool = True) -> list[int]:
    """Tokenize ``text`` once, without special tokens, and put the BOS token at the very start only."""
    if not isinstance(text, str):
        raise PgpruneError(f"text must be a str, got {type(text).__name__}")
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = list(enc["input_ids"])
    if add_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            log.warning("tokenizer %s has no BOS token; blocks start without one", type(tokenizer).__name__)
        else:
            ids.insert(0, int(bos))
    return ids


def tokenize_blocks(text: str, tokenizer: Any, seq_len: int, *, add_bos: bool = True,
                    max_blocks: int | None = None) -> torch.Tensor:
    """Return a LongTensor ``[n, seq_len]`` of consecutive non-overlapping blocks of the tokenized ``text``.

    The text is tokenized once (BOS only at the very start when ``add_bos``); the remainder that does not fill a
    block is dropped; ``max_blocks`` keeps the first blocks only.
    """
    _check_seq_len(seq_len)
    if max_blocks is not None and max_blocks < 1:
        raise PgpruneError(f"max_blocks must be >= 1 or None, got {max_blocks}")
    ids = tokenize_stream(text, tokenizer, add_bos=add_bos)
    n = len(ids) // seq_len
    if n < 1:
        raise PgpruneError(f"text yields {len(ids)} tokens, fewer than seq_len={seq_len}: not even one block; "
                           f"give more text or a shorter seq_len")
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def calibration_blocks(text: str, tokenizer: Any, seq_len: int, n: int, seed: int, *,
                       add_bos: bool = True) -> torch.Tensor:
    """Return a LongTensor ``[n, seq_len]`` of ``n`` windows at uniformly random (seeded) offsets of the token stream.

    Windows may overlap each other; the same ``seed`` always gives the same windows.
    """
    _check_seq_len(seq_len)
    if not isinstance(n, int) or n < 1:
        raise PgpruneError(f"n (number of calibration windows) must be an integer >= 1, got {n!r}")
    ids = tokenize_stream(text, tokenizer, add_bos=add_bos)
    if len(ids) < seq_len:
        raise PgpruneError(f"text yields {len(ids)} tokens, fewer than seq_len={seq_len}: no calibration window fits")
    stream = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, len(ids) - seq_len + 1, (n,), generator=gen)
    return torch.stack([stream[s: s + seq_len] for s in starts.tolist()])
