"""Spill: results that a layer-by-layer pass must keep, moved out of the process's memory onto disk as they are made.

A streamed pass (layers read from disk one at a time) keeps its resident memory near one layer's worth, but a result
that grows with every layer (the refit's new o_proj/down_proj weights: about a sixth of the model at 50% sparsity)
would grow with it. :class:`Spill` writes each layer's tensors to a file with ``torch.save`` and hands back the same
tensors loaded with ``torch.load(mmap=True)``: the bytes are identical, but they live in the page cache (file-backed,
reclaimable, read back on use) instead of the process's anonymous memory. On POSIX the file is unlinked as soon as
it is mapped (the mapping keeps it alive; nothing is left behind even after a kill); elsewhere the folder is removed
at exit.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import torch

from pgprune.errors import PgpruneError


class Spill:
    """Tensors written to ``folder`` (default: a new folder in the system temporary directory) and mapped back."""

    def __init__(self, folder: str | os.PathLike | None = None):
        parent = None if folder is None else os.fspath(folder)
        if parent is not None and not os.path.isdir(parent):
            raise PgpruneError(f"spill folder {parent!r} is not a directory; allowed: an existing folder (or none: "
                               "the system temporary directory)")
        self.folder = tempfile.mkdtemp(prefix="pgprune-spill-", dir=parent)
        self._count = 0
        atexit.register(shutil.rmtree, self.folder, True)

    def put(self, tensors: dict) -> dict:
        """The nested dict/tuple of tensors ``tensors``, the same values, backed by a mapped file."""
        path = os.path.join(self.folder, f"{self._count:06d}.pt")
        self._count += 1
        try:
            torch.save(tensors, path)
            out = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except OSError as e:
            raise PgpruneError(f"cannot spill to {self.folder!r} ({e.strerror or e}); free disk space there or "
                               "choose another folder") from None
        try:
            os.unlink(path)  # POSIX: the mapping keeps the file's pages; nothing to clean up later
        except OSError:
            pass  # Windows: a mapped file cannot be removed; the folder goes at exit
        return out

    def close(self) -> None:
        """Remove the folder (the tensors already handed out stay valid on POSIX: their files are mapped)."""
        shutil.rmtree(self.folder, ignore_errors=True)
