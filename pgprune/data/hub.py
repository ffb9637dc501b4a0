"""Real-use text corpora (WikiText-2, C4, PTB) through Hugging Face ``datasets``, with an offline path.

On the hub the corpora are read exactly as the paper's protocol reads them (method-notes §3.1):

* ``wikitext2``: ``load_dataset("wikitext", "wikitext-2-raw-v1")``, the ``text`` lines joined with ``"\\n\\n"``;
* ``c4``: ``allenai/c4`` English shards, train ``00000-of-01024`` (calibration) and validation ``00000-of-00008``
  (evaluation; asking for ``test`` gives this shard, as the reference code does), documents joined with ``" "``;
* ``ptb``: ``ptb_text_only`` (``penn_treebank``), the ``sentence`` field joined with ``" "``.

Given ``data_files`` (local parquet / json / jsonl / txt in the same schema), the generic ``datasets`` builders
load those instead, which is how the tests and offline machines run. Nothing here is imported until it is used.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

from pgprune.errors import PgpruneError

DataFiles = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], Mapping[str, Any]]


@dataclass(frozen=True)
class HubCorpus:
    """Where a named corpus lives on the hub and how its records are joined into one text."""

    path: str
    config: str | None
    field: str
    separator: str
    splits: Mapping[str, str]  # requested split -> split name on the hub (or C4 shard file)
    aliases: tuple[str, ...] = ()  # other hub ids of the same data, tried in order (e.g. after a repo move)


HUB_CORPORA: dict[str, HubCorpus] = {
    "wikitext2": HubCorpus("wikitext", "wikitext-2-raw-v1", "text", "\n\n",
                           {"train": "train", "validation": "validation", "test": "test"},
                           aliases=("Salesforce/wikitext",)),
    "c4": HubCorpus("allenai/c4", None, "text", " ",
                    {"train": "en/c4-train.00000-of-01024.json.gz",
                     "validation": "en/c4-validation.00000-of-00008.json.gz",
                     "test": "en/c4-validation.00000-of-00008.json.gz"}),
    "ptb": HubCorpus("ptb_text_only", "penn_treebank", "sentence", " ",
                     {"train": "train", "validation": "validation", "test": "test"},
                     aliases=("ptb-text-only/ptb_text_only",)),
}

_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation", "eval": "validation"}
_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".txt": "text"}
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_names() -> list[str]:
    """Names accepted by :func:`load_hub_text`."""
    return sorted(HUB_CORPORA)


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``/``TRANSFORMERS_OFFLINE`` asks for offline mode."""
    return any(os.environ.get(k, "").upper() in _TRUE
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@contextlib.contextmanager
def hf_offline(enabled: bool | None = None) -> Iterator[bool]:
    """Make ``huggingface_hub``/``datasets`` honour offline mode for the duration of the block.

    Both libraries read the ``HF_*_OFFLINE`` variables once, at import; setting them later has no effect unless
    their cached constants are patched too, which this does. ``enabled=None`` follows the environment as it is
    now; ``True`` forces offline mode; ``False`` leaves everything untouched. Yields whether offline mode is on.
    """
    if enabled is None:
        enabled = is_offline()
    if not enabled:
        yield False
        return
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    patched: list[tuple[Any, str, Any]] = []
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    for modname, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                           ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        try:
            mod = __import__(modname, fromlist=["_"])
        except ImportError:  # pragma: no cover - both are dependencies
            continue
        for attr in attrs:
            if hasattr(mod, attr):
                patched.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, True)
    try:
        yield True
    finally:
        for mod, attr, old in reversed(patched):
            setattr(mod, attr, old)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _norm_split(split: str) -> str:
    return _SPLIT_ALIASES.get(split, split)


def _builder_for(path: str) -> str:
    name = str(path).lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst", ".zip"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    ext = Path(name).suffix
    if ext not in _BUILDERS:
        raise PgpruneError(f"data file '{path}' has extension '{ext or '(none)'}'; "
                           f"supported: {', '.join(sorted(_BUILDERS))} (optionally compressed)")
    return _BUILDERS[ext]


def _flat_files(data_files: DataFiles) -> list[str]:
    if isinstance(data_files, (str, os.PathLike)):
        return [os.fspath(data_files)]
    if isinstance(data_files, Mapping):
        out: list[str] = []
        for v in data_files.values():
            out += _flat_files(v)
        return out
    return [os.fspath(p) for p in data_files]


def _load_local(data_files: DataFiles, split: str, cache_dir: str | None):
    """Load local files with the generic builder; a mapping selects ``split``, anything else is the whole set."""
    from datasets import load_dataset

    files = _flat_files(data_files)
    if not files:
        raise PgpruneError("data_files is empty; give one or more local parquet/json/jsonl/txt files")
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        raise PgpruneError(f"data file(s) not found: {', '.join(missing)}")
    builders = {_builder_for(f) for f in files}
    if len(builders) > 1:
        raise PgpruneError(f"data_files mix formats ({', '.join(sorted(builders))}); give files of one format")
    builder = builders.pop()
    if isinstance(data_files, Mapping):
        keys = {_norm_split(str(k)): k for k in data_files}
        if _norm_split(split) not in keys:
            raise PgpruneError(f"split '{split}' not in data_files; it has: {', '.join(map(str, data_files))}")
        spec = {"data": _flat_files(data_files[keys[_norm_split(split)]])}
    else:
        spec = {"data": files}
    with hf_offline(True):  # generic builders never need the network
        return load_dataset(builder, data_files=spec, split="data", cache_dir=cache_dir)


def _load_hub(name: str, corpus: HubCorpus, split: str, cache_dir: str | None):
    from datasets import load_dataset

    hub_split = corpus.splits.get(_norm_split(split))
    if hub_split is None:
        raise PgpruneError(f"split '{split}' is not available for '{name}'; allowed: {', '.join(corpus.splits)}")
    errors: list[str] = []
    last: Exception | None = None
    for path in (corpus.path, *corpus.aliases):
        try:
            with hf_offline(None):
                if name == "c4":
                    return load_dataset(path, data_files={"data": hub_split}, split="data", cache_dir=cache_dir)
                return load_dataset(path, corpus.config, split=hub_split, cache_dir=cache_dir)
        except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFoundError)
            errors.append(f"'{path}': {type(exc).__name__}: {exc}")
            last = exc
    where = f"{corpus.config + ', ' if corpus.config else ''}split '{hub_split}'"
    mode = "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if is_offline() else "the hub was not reachable"
    raise PgpruneError(
        f"could not load corpus '{name}' ({where}) from the Hugging Face hub; {mode}. The dataset must be in the "
        f"local datasets cache, or be given as data_files=<local parquet/json/jsonl/txt with field "
        f"'{corpus.field}'>. Tried: {'; '.join(errors)}") from last


def _column(ds, name: str, field: str) -> list[str]:
    cols = list(ds.column_names)
    for f in (field, "text", "sentence"):
        if f in cols:
            return [str(x) for x in ds[f]]
    raise PgpruneError(f"corpus '{name}' has no '{field}' column; the data has columns: {', '.join(cols)}")


def load_hub_documents(name: str, split: str, *, data_files: DataFiles | None = None, max_chars: int | None = None,
                       cache_dir: str | None = None) -> list[str]:
    """Return the records (lines / documents / sentences) of corpus ``name``, split ``split``, as strings.

    ``max_chars`` stops once the records (plus separators) hold that many characters; the last one is cut.
    """
    if name not in HUB_CORPORA:
        raise PgpruneError(f"unknown corpus '{name}'; allowed: {', '.join(hub_names())}")
    if max_chars is not None and max_chars <= 0:
        raise PgpruneError(f"max_chars must be positive, got {max_chars}")
    corpus = HUB_CORPORA[name]
    ds = (_load_local(data_files, split, cache_dir) if data_files is not None
          else _load_hub(name, corpus, split, cache_dir))
    docs = _column(ds, name, corpus.field)
    if max_chars is None:
        return docs
    out: list[str] = []
    used = 0
    for d in docs:
        room = max_chars - used
        if room <= 0:
            break
        out.append(d[:room])
        used += len(out[-1]) + len(corpus.separator)
    return out


def load_hub_text(name: str, split: str, *, data_files: DataFiles | None = None, max_chars: int | None = None,
                  cache_dir: str | None = None) -> str:
    """Return corpus ``name`` (``wikitext2`` | ``c4`` | ``ptb``), split ``split``, joined into one text.

    Records are joined with the corpus separator (``"\\n\\n"`` for WikiText-2, ``" "`` otherwise); the result is
    cut to ``max_chars`` characters when given. ``data_files`` (path, list of paths or ``{split: paths}``) loads
    local files in the same schema instead of the hub. Raises :class:`PgpruneError` for an unknown name or when
    the hub copy is neither cached nor reachable.
    """
    docs = load_hub_documents(name, split, data_files=data_files, max_chars=max_chars, cache_dir=cache_dir)
    text = HUB_CORPORA[name].separator.join(docs)
    return text[:max_chars] if max_chars is not None else text
