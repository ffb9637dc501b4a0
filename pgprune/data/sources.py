"""Text sources by name or file for ``pgprune prune``/``eval`` and :func:`pgprune.prune`: a corpus name
(``wikitext2``, ``c4``, ``ptb``, ``local``, ``licenses``) or the path of a text/jsonl file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pgprune.errors import ConfigError, MissingFileError, PgpruneError

if TYPE_CHECKING:
    from pgprune.config import Params


HUB_TEXTS = ("wikitext2", "c4", "ptb")


CALIBRATION_SOURCES = (*HUB_TEXTS, "local")


EVAL_SOURCES = (*HUB_TEXTS, "local", "licenses")


TEXT_FILE_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json")


def read_text_file(path: str | Path, field_name: str = "text") -> str:
    """The text of a local file: ``.txt``/``.text``/``.md`` as is; ``.jsonl`` (one JSON record per line) or ``.json``
    (a list of records, or one record) joined from each record's ``field_name`` with blank lines between records.
    Errors name the file and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"text file '{p}' not found")
    suffix = p.suffix.lower()
    if suffix not in TEXT_FILE_SUFFIXES:
        raise PgpruneError(f"text file '{p}' has the extension '{suffix or '(none)'}'; allowed: "
                           f"{', '.join(TEXT_FILE_SUFFIXES)} (.jsonl/.json: records with a '{field_name}' field)")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PgpruneError(f"text file '{p}' is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}); "
                           "allowed: a UTF-8 text file (.txt/.md, or .jsonl/.json records)") from None
    if "\x00" in raw:
        raise PgpruneError(f"text file '{p}' is not UTF-8 text (it holds NUL bytes: a binary file?); allowed: a "
                           "UTF-8 text file (.txt/.md, or .jsonl/.json records)")
    if suffix not in (".jsonl", ".json"):
        text = raw
    else:
        try:
            if suffix == ".jsonl":
                records = [json.loads(line) for line in raw.splitlines() if line.strip()]
            else:
                doc = json.loads(raw)
                records = doc if isinstance(doc, list) else [doc]
        except json.JSONDecodeError as e:
            raise PgpruneError(f"'{p}' is not valid {suffix[1:].upper()}: {e}") from None
        bad = [i for i, r in enumerate(records) if not (isinstance(r, dict) and isinstance(r.get(field_name), str))]
        if bad:
            raise PgpruneError(f"'{p}': record {bad[0] + 1} has no string field '{field_name}' (each record must be "
                               f'an object like {{"{field_name}": "..."}})')
        text = "\n\n".join(r[field_name] for r in records)
    if not text.strip():
        raise PgpruneError(f"text file '{p}' holds no text")
    return text


def is_text_file_name(source: str) -> bool:
    return Path(str(source)).suffix.lower() in TEXT_FILE_SUFFIXES


def named_text(source: str, params: Params, purpose: str = "calibration") -> tuple[str, str]:
    """(text, description) of a text source for ``purpose`` "calibration" (the train split / calibration part) or
    "evaluation" (the test split, C4's validation shard / the held-out part): ``wikitext2`` | ``c4`` | ``ptb`` (the
    hub, or params.data.data_files[name] offline), ``local`` (the embedded Debian corpus), ``licenses``
    (evaluation only) or the path of a text/jsonl file (:func:`read_text_file`)."""
    from pgprune.data import load_hub_text

    d = params.data
    allowed = CALIBRATION_SOURCES if purpose == "calibration" else EVAL_SOURCES
    name = str(source)
    if name in allowed:
        if name == "local":
            from pgprune.data.corpus import interleave, load_local_corpus

            local = load_local_corpus(d.local_sources, d.heldout_fraction, d.seed)
            part = "calibration" if purpose == "calibration" else "heldout"
            return (interleave({s: v[part] for s, v in local.items()}, d.seed),
                    f"local ({'+'.join(d.local_sources)}, {'calibration' if part == 'calibration' else 'held-out'} "
                    "documents)")
        if name == "licenses":
            from pgprune.data.corpus import license_text

            return license_text(), "licenses (/usr/share/common-licenses)"
        if purpose == "calibration":
            split, max_chars = "train", d.calib_blocks * d.seq_len * 8
        else:
            split = "validation" if name == "c4" else "test"
            max_chars = params.eval.ppl_blocks * params.eval.ppl_seq_len * 8 if name == "c4" else None
        text = load_hub_text(name, split, data_files=d.data_files.get(name), max_chars=max_chars)
        return text, f"{name} ({split} split{', local files' if name in d.data_files else ''})"
    p = Path(name)
    if p.is_file() or is_text_file_name(name):
        return read_text_file(p), f"text file {p.name}"
    raise ConfigError(f"{purpose} source {name!r} is neither a corpus nor a file; allowed: {', '.join(allowed)} or "
                      f"the path of a {'/'.join(TEXT_FILE_SUFFIXES)} file")


def text_calibration_blocks(text: str, tokenizer, params: Params, source: str = "the calibration text"
                            ) -> torch.Tensor:
    """data.calib_blocks random windows of data.seq_len tokens of ``text`` (seed data.seed) [n, seq_len]. Too
    short a text raises ConfigError naming ``source``, data.seq_len and both token counts."""
    from pgprune.data import calibration_blocks

    d = params.data
    return calibration_blocks(text, tokenizer, d.seq_len, d.calib_blocks, d.seed, source=source,
                              setting="data.seq_len")


def source_calibration(source: str, tokenizer, params: Params) -> tuple[torch.Tensor, str]:
    """(calibration blocks [data.calib_blocks, data.seq_len], description) of a named corpus or text file."""
    text, desc = named_text(source, params, "calibration")
    blocks = text_calibration_blocks(text, tokenizer, params, source=f"calibration {desc}")
    return blocks, f"{desc}: {blocks.shape[0]} blocks of {blocks.shape[1]} tokens"


def eval_blocks(source: str, tokenizer, params: Params) -> tuple[torch.Tensor, str]:
    """(the first eval.ppl_blocks non-overlapping blocks of eval.ppl_seq_len tokens, description) of a named corpus
    or a text file (the evaluation split / held-out part)."""
    from pgprune.data import tokenize_blocks

    text, desc = named_text(source, params, "evaluation")
    return tokenize_blocks(text, tokenizer, params.eval.ppl_seq_len, max_blocks=params.eval.ppl_blocks,
                           source=f"evaluation {desc}", setting="eval.ppl_seq_len"), desc


__all__ = ["HUB_TEXTS", "CALIBRATION_SOURCES", "EVAL_SOURCES", "TEXT_FILE_SUFFIXES", "read_text_file",
           "is_text_file_name", "named_text", "text_calibration_blocks", "source_calibration", "eval_blocks"]
