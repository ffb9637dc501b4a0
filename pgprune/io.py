"""Atomic writes: every output is written to a temporary file in the same folder, then renamed."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` (an existing folder is removed
    first), with the usual permissions (mkdtemp makes 0700); on failure nothing at ``path`` changes."""
    import shutil

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def flatten_tensors(nested: Any, prefix: str = "") -> dict[str, Any]:
    """{"flap": {"heads": T, "bias": {"o_proj": [T0, T1]}}} -> {"flap/heads": T, "flap/bias/o_proj/0": T0, ...}."""
    out: dict[str, Any] = {}
    if isinstance(nested, dict):
        items = nested.items()
    elif isinstance(nested, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(nested))
    else:
        return {prefix: nested}
    for k, v in items:
        k = str(k)
        if "/" in k or not k:
            raise ValueError(f"key {k!r} cannot be stored (empty or contains '/')")
        out.update(flatten_tensors(v, f"{prefix}/{k}" if prefix else k))
    return out


def unflatten_tensors(flat: dict[str, Any]) -> Any:
    """Inverse of :func:`flatten_tensors` (all-digit keys become list positions)."""
    root: dict = {}
    for key in sorted(flat, key=lambda k: [(0, int(p)) if p.isdigit() else (1, p) for p in k.split("/")]):
        node = root
        *head, last = key.split("/")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = flat[key]

    def listify(node):
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[str(i)] for i in range(len(node))]
        return node

    return listify(root)


def save_tensors(path: str | os.PathLike, tensors: Any, metadata: dict[str, str] | None = None) -> None:
    """Write (nested) tensors as safetensors, atomically. The bytes depend only on the tensors and the metadata
    (no file names or timestamps inside), so the same inputs give the same file hash on every run. ``metadata``: at
    most one entry (safetensors writes a metadata map of several entries in no fixed order; pack them into one JSON
    string)."""
    from safetensors.torch import save

    if metadata is not None and len(metadata) > 1:
        raise ValueError(f"save_tensors: {len(metadata)} metadata entries would be written in no fixed order; pack "
                         "them into one (a JSON string)")

    flat = {k: v.detach().contiguous().cpu() for k, v in flatten_tensors(tensors).items()}
    write_bytes(path, save(flat, metadata=metadata))


def load_tensors(path: str | os.PathLike, what: str = "tensors", nested: bool = True, metadata: bool = False) -> Any:
    """Read a safetensors file written by :func:`save_tensors` (with ``metadata``: (tensors, its metadata dict),
    from the same single read); a missing or damaged file raises an error that names it and the stage that writes
    it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from pgprune.errors import MissingFileError, PgpruneError, require_file

    p = require_file(path, what)
    try:
        raw = Path(p).read_bytes()
        flat = load(raw)
        # the header: 8 bytes of little-endian length, then JSON with the optional "__metadata__" entry
        meta = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")]).get("__metadata__") or {} if metadata else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise PgpruneError(f"{what} at '{p}' is damaged or not a safetensors file ({e}); delete it and rerun the "
                           "stage that writes it (dvc repro)") from None
    except MissingFileError:  # pragma: no cover
        raise
    out = unflatten_tensors(flat) if nested else flat
    return (out, meta) if metadata else out


def tensor_digest(tensors) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a state dict (or of a list of tensors)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    for name, t in items:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _json_default(o: Any):
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
