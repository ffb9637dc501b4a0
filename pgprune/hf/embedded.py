"""The embedded model as a loadable folder for the commands and the API: converted once from its GGUF package into
a cache folder (float32, exact dequantisation); every other source is returned as given."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from pgprune.errors import ConfigError, MissingFileError

log = logging.getLogger("pgprune")


def embedded_cache(source: str) -> Path:
    """Where `pgprune` keeps the converted embedded model ($PGPRUNE_CACHE, else $XDG_CACHE_HOME/pgprune, else
    ~/.cache/pgprune)."""
    root = os.environ.get("PGPRUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "pgprune"
    return Path(root) / "models" / source.split(":", 1)[1]


def model_folder(source: str) -> str:
    """A loadable source: the embedded model converted once into the cache (float32, exact dequantisation), any
    other source as given."""
    from pgprune.hf.loading import EMBEDDED

    if not source.startswith("embedded:"):
        return source
    if source not in EMBEDDED:
        raise ConfigError(f"unknown embedded model {source!r}; allowed: {', '.join(sorted(EMBEDDED))}, a folder or a "
                          "hub id")
    folder = embedded_cache(source)
    if not (folder / "config.json").exists():
        from pgprune.hf.loading import gguf_path, prepare_model

        try:
            gguf_path(source)
        except MissingFileError as e:
            first = " ".join(x.strip() for x in str(e).splitlines() if x.strip())
            raise MissingFileError(f"{source} is not prepared ({folder} has no config.json) and cannot be converted: "
                                   f"{first}; then any pgprune command converts it once") from None
        log.info("converting %s into %s (once)", source, folder)
        prepare_model(source, folder, dtype="float32")
    return str(folder)


__all__ = ["embedded_cache", "model_folder"]
