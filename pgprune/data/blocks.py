"""Cut a text into token blocks: non-overlapping blocks for evaluation, random windows for calibration."""
from __future__ import annotations

import logging
from typing import Any

import torch

from pgprune.errors import ConfigError, PgpruneError

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


# params setting -> the command-line option that sets it (messages name both)
OPTION_OF = {"data.seq_len": "--seq-len", "eval.ppl_seq_len": "--seq-len"}


def _too_short(n_tokens: int, seq_len: int, source: str | None, setting: str | None, what: str) -> ConfigError:
    src = source or "the text"
    name = setting or "seq_len"
    opt = f"{name}={seq_len}" + (f" ({OPTION_OF[name]})" if name in OPTION_OF else "")
    return ConfigError(f"{src} has {n_tokens} tokens, fewer than the {seq_len} that {opt} needs for {what}; allowed: "
                       f"a text of at least {seq_len} tokens, or a smaller {name}")


def tokenize_blocks(text: str, tokenizer: Any, seq_len: int, *, add_bos: bool = True,
                    max_blocks: int | None = None, source: str | None = None,
                    setting: str | None = None) -> torch.Tensor:
    """Return a LongTensor ``[n, seq_len]`` of consecutive non-overlapping blocks of the tokenized ``text``.

    The text is tokenized once (BOS only at the very start when ``add_bos``); the remainder that does not fill a
    block is dropped; ``max_blocks`` keeps the first blocks only. ``source``/``setting`` name the text and the
    setting of ``seq_len`` in the error a too-short text raises.
    """
    _check_seq_len(seq_len)
    if max_blocks is not None and max_blocks < 1:
        raise PgpruneError(f"max_blocks must be >= 1 or None, got {max_blocks}")
    ids = tokenize_stream(text, tokenizer, add_bos=add_bos)
    n = len(ids) // seq_len
    if n < 1:
        raise _too_short(len(ids), seq_len, source, setting, "one block")
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def calibration_blocks(text: str, tokenizer: Any, seq_len: int, n: int, seed: int, *,
                       add_bos: bool = True, source: str | None = None, setting: str | None = None) -> torch.Tensor:
    """Return a LongTensor ``[n, seq_len]`` of ``n`` windows at uniformly random (seeded) offsets of the token stream.

    Windows may overlap each other; the same ``seed`` always gives the same windows. ``source``/``setting`` name
    the text and the setting of ``seq_len`` in the error a too-short text raises.
    """
    _check_seq_len(seq_len)
    if not isinstance(n, int) or n < 1:
        raise PgpruneError(f"n (number of calibration windows) must be an integer >= 1, got {n!r}")
    ids = tokenize_stream(text, tokenizer, add_bos=add_bos)
    if len(ids) < seq_len:
        raise _too_short(len(ids), seq_len, source, setting, "one calibration window")
    stream = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, len(ids) - seq_len + 1, (n,), generator=gen)
    return torch.stack([stream[s: s + seq_len] for s in starts.tolist()])


def recut_blocks(blocks: torch.Tensor, seq_len: int, max_blocks: int) -> torch.Tensor:
    """``blocks`` [n, T] as [m, seq_len] (the tokens in order, the remainder dropped; unchanged when T == seq_len),
    the first ``max_blocks`` (the recovery's training blocks from the calibration blocks)."""
    n, t = blocks.shape
    if t != seq_len:
        m = (n * t) // seq_len
        if m < 1:
            raise PgpruneError(f"recover.seq_len={seq_len} is longer than the {n * t} calibration tokens; allowed: "
                               f"at most {n * t}")
        blocks = blocks.reshape(-1)[: m * seq_len].reshape(m, seq_len)  # [m, seq_len]
    return blocks[:max_blocks]
