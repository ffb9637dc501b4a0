"""Where a decoder layer's weights come from during a layer-major forward, and how they reach the compute device.

Every decoder layer has a *home*:

* ``resident``: its parameters sit on the device it runs on (the ordinary in-memory model, or a layer that
  ``model.device_map: auto`` put on a GPU); it is used as it is, no copy;
* ``cpu``: its parameters sit in CPU memory (pinned when the compute device is a GPU) and are copied to the compute
  device each time the layer runs (``model.offload: cpu``);
* ``disk``: its parameters are not in memory at all (the module holds ``meta`` tensors); they are read from the
  checkpoint's safetensors files each time the layer runs (``model.offload: disk``, or layers that
  ``device_map: auto`` sent to disk). The reader seeks to each tensor's byte range and reads it into a fresh
  (pinned) buffer: no memory map, so the pages read never count in the process's resident set.

The home follows from where the parameters are (meta: disk; CPU while the compute device is a GPU: cpu; else
resident) plus the :class:`Placement` that :func:`pgprune.hf.loading.load_model` attaches to the model
(``model.pgprune_placement``: the compute device and the safetensors reader).

A streamed layer runs through a weightless copy of the decoder layer (a *slot*: the module tree with meta
parameters) whose parameters are swapped for the loaded tensors while the layer runs, so the family's own modules
(norms, activation) are used unchanged and the adapter finds the parts by their usual names. While layer i runs,
layer i+1 is loaded by a background thread (disk read, host-to-device copy on a separate CUDA stream), so at most two
layers are materialised at a time. This is the sequential on-loading of llm-compressor / SparseGPT-style
pipelines; unlike accelerate's offload hooks (one module at a time, on every forward of every sample), a layer
here is loaded once per *sweep*: every row of every sample passes through it before the next layer.
"""
from __future__ import annotations

import copy
import json
import os
import queue
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pgprune.core.adapters import get_adapter
from pgprune.core.adapters.base import Adapter, LayerParts
from pgprune.errors import ConfigError, MissingFileError, PgpruneError

HOMES = ("resident", "cpu", "disk")
ATTR = "pgprune_placement"
_ALIGN = 64

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


# --- reading safetensors by byte range ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsReader:
    """Named tensors of a checkpoint folder's ``*.safetensors`` files (sharded or not), read by byte range.

    Only the headers are parsed up front; :meth:`read` seeks to each tensor and reads its bytes into a new CPU
    tensor (pinned on request), so nothing stays mapped or cached in the process after the tensors are dropped.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise MissingFileError(f"no *.safetensors files in '{self.folder}'; layer streaming (model.offload: disk, "
                                   "device_map disk layers) reads the checkpoint's safetensors files: re-save the "
                                   "model with save_pretrained(..., safe_serialization=True)")
        self.entries: dict[str, _Entry] = {}
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            base = 8 + n
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                if e["dtype"] not in _ST_DTYPES:
                    raise PgpruneError(f"{f.name}: tensor {name} has dtype {e['dtype']}; allowed: {sorted(_ST_DTYPES)}")
                a, b = e["data_offsets"]
                self.entries[name] = _Entry(f, _ST_DTYPES[e["dtype"]], tuple(e["shape"]), base + a, b - a)

    def digest(self, sample: int = 4096) -> str:
        """Identity of the weights without reading them all: every file's header, size and ``sample`` bytes taken
        at evenly spaced offsets (a changed checkpoint changes it; cheap for a 70B model)."""
        import hashlib

        h = hashlib.sha256()
        for f in sorted({e.file for e in self.entries.values()}):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                h.update(fh.read(n))
                chunks = 16
                for k in range(chunks):
                    fh.seek(8 + n + (size - 8 - n) * k // chunks)
                    h.update(fh.read(sample // chunks))
        return h.hexdigest()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def nbytes(self, names) -> int:
        return sum(self.entries[n].nbytes for n in names)

    def _check(self, names) -> None:
        missing = [n for n in names if n not in self.entries]
        if missing:
            raise PgpruneError(f"the checkpoint in '{self.folder}' has no tensor(s) {missing[:4]}; its names must "
                               "match the model's parameter names")

    def staging_bytes(self, names) -> int:
        """Bytes of a buffer that :meth:`read` can place all of ``names`` in (each tensor 64-byte aligned)."""
        return sum(-(-self.entries[n].nbytes // _ALIGN) * _ALIGN for n in names)

    def read(self, names, pin: bool = False, into: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{name: CPU tensor} in the checkpoint's dtype. ``pin``: page-locked memory (fast, async copies to a GPU).
        ``into``: a uint8 buffer of at least :meth:`staging_bytes` bytes that the tensors become views of (reusing
        one buffer avoids the page faults of fresh allocations, which cost more than the read itself)."""
        names = list(names)
        self._check(names)
        out: dict[str, torch.Tensor] = {}
        jobs: list[tuple[Path, int, memoryview, str]] = []
        pos = 0
        for n in sorted(names, key=lambda k: (str(self.entries[k].file), self.entries[k].start)):
            e = self.entries[n]
            if into is None:
                buf = torch.empty(e.nbytes, dtype=torch.uint8, pin_memory=pin)
            else:
                buf = into[pos:pos + e.nbytes]
                pos += -(-e.nbytes // _ALIGN) * _ALIGN
            if e.nbytes:
                view = memoryview(buf.numpy())
                for s in range(0, e.nbytes, _READ_CHUNK):  # chunks read by parallel threads
                    jobs.append((e.file, e.start + s, view[s:s + _READ_CHUNK], n))
            out[n] = buf.view(e.dtype).reshape(e.shape)
        _read_jobs(jobs)
        return out

_READ_CHUNK = 8 << 20  # bytes per read call
_READERS: ThreadPoolExecutor | None = None


def _read_jobs(jobs) -> None:
    """Read every (file, offset, buffer, name) job with positional reads, several at a time (copying out of the
    page cache is CPU-bound: one thread reads ~3-5 GB/s, a few threads several times that)."""
    global _READERS
    if not jobs:
        return
    fds: dict[Path, int] = {}
    try:
        for f, _, _, _ in jobs:
            if f not in fds:
                fds[f] = os.open(f, os.O_RDONLY)

        def one(job):
            f, off, view, name = job
            got = 0
            while got < len(view):
                k = os.preadv(fds[f], [view[got:]], off + got)
                if not k:
                    raise PgpruneError(f"{f}: truncated while reading tensor {name}")
                got += k

        threads = min(8, os.cpu_count() or 1)
        if threads > 1 and len(jobs) > 1:
            if _READERS is None:
                _READERS = ThreadPoolExecutor(threads, thread_name_prefix="pgprune-read")
            for fut in [_READERS.submit(one, j) for j in jobs]:
                fut.result()
        else:
            for j in jobs:
                one(j)
    finally:
        for fd in fds.values():
            os.close(fd)


def checkpoint_folder(src: str) -> Path:
    """Local folder holding a checkpoint's safetensors: ``src`` itself, or its snapshot in the Hugging Face cache."""
    p = Path(src)
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # noqa: BLE001 - any hub error means: not available offline
        raise MissingFileError(f"model {src!r} is neither a local folder nor in the Hugging Face cache ({e}); "
                               "layer streaming reads the safetensors files, so download the model first") from e


# --- placement attached to a loaded model ---------------------------------------------------------------------
@dataclass
class Placement:
    """What :func:`pgprune.hf.loading.load_model` records on a model it loaded for streaming or several devices."""

    compute_device: torch.device
    reader: SafetensorsReader | None = None
    device_map: dict[str, str | int] = field(default_factory=dict)
    pin: bool = False
    stream_resident: bool = False  # treat layers held on the compute device as offloaded (exercises the
    # streaming path on a CPU-only machine: the per-use "copy" is then a no-op; results are unchanged)


def placement(model) -> Placement | None:
    return getattr(model, ATTR, None)


def attach(model, plc: Placement) -> None:
    """Record ``plc`` on the model (read by :class:`WeightSource` and :func:`is_streamed`)."""
    setattr(model, ATTR, plc)


def available_devices() -> list[str]:
    """The compute devices of this machine, as ``model.device`` / ``--device`` take them."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def normalize_device(device: torch.device | str) -> torch.device:
    """'cuda' -> 'cuda:<current>' (tensors always carry an index; comparisons need it). A device string torch does
    not know, or a device this machine lacks, raises ConfigError naming it and the available ones."""
    given = device
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device {given!r} is not a device; allowed on this machine: "
                          f"{', '.join(available_devices())}") from None
    if device.type == "meta":  # weightless models (internal)
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(given)!r} is not available: this machine has no CUDA device (or torch "
                              f"was built without CUDA); allowed on this machine: {', '.join(available_devices())}")
        if device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(given)!r} is not available: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s); allowed on this machine: "
                              f"{', '.join(available_devices())}")
        return device
    if device.type == "cpu" or device.type == "mps" and "mps" in available_devices():
        return device
    raise ConfigError(f"device {str(given)!r} is not available; allowed on this machine: "
                      f"{', '.join(available_devices())}")


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return torch.device("cpu")


def main_device(model, adapter: Adapter | None = None) -> torch.device:
    """Device of the embeddings: where input ids go and where streamed layers run (unless told otherwise)."""
    plc = placement(model)
    if plc is not None:
        return normalize_device(plc.compute_device)
    adapter = adapter or get_adapter(model)
    return adapter.decoder().embed_tokens.weight.device


def layer_homes(model, adapter: Adapter | None = None, device: torch.device | str | None = None):
    """(homes, devices): per decoder layer its home (see module docstring) and the device it runs on."""
    adapter = adapter or get_adapter(model)
    compute = normalize_device(device) if device is not None else main_device(model, adapter)
    plc = placement(model)
    force = plc is not None and plc.stream_resident
    homes, devices = [], []
    for layer in adapter.layers():
        dev = _device_of(layer)
        if dev.type == "meta":
            homes.append("disk")
            devices.append(compute)
        elif dev.type != "cpu" and device is None and not force:
            homes.append("resident")  # a GPU layer runs where it is (device_map over GPUs)
            devices.append(dev)
        elif dev == compute and not force:
            homes.append("resident")
            devices.append(dev)
        else:
            homes.append("cpu")
            devices.append(compute)
    return homes, devices


_LIBC: object = None


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere). A layer-by-layer
    pass frees and reallocates tensors of many sizes (a layer's weights, float64 Gram matrices of every width);
    glibc keeps the freed ones below its mmap threshold in its heaps, so the process's resident memory grows with
    the fragmentation, not with what is alive. Called once per layer by the refit: what is resident stays close to
    what the current layer needs (bench.refit_cost)."""
    if _libc():
        _LIBC.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_MMAP_THRESHOLD = 128 * 1024  # glibc's initial value
_MMAP_FIXED = False


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _LIBC = False
    return _LIBC


def fixed_mmap_threshold() -> None:
    """Fix glibc's mmap threshold at its initial 128 KiB (``mallopt(M_MMAP_THRESHOLD)``; a no-op elsewhere), once
    per process. glibc raises the threshold to the size of every mmapped block that is freed (up to 32 MiB), so
    after a streamed pass frees its first layer, buffers of a few MiB (activations, a layer's smaller weights,
    float64 statistics) come from the heap, where freeing them leaves holes that ``malloc_trim`` cannot always
    return. Fixed, every buffer above 128 KiB is its own mapping and goes back to the OS when freed. Called when a
    model is loaded with ``offload="disk"`` (set later, the heap that loading grew stays; bench.refit_cost measured
    0.34x or 0.44x the weights from run to run then, 0.34x every time when set at loading) and by streamed passes
    (the refit), whose point is a small resident memory; the cost is a page fault per fresh page."""
    global _MMAP_FIXED
    if not _MMAP_FIXED and _libc():
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        _MMAP_FIXED = True


def is_streamed(model) -> bool:
    """True when the model cannot run as one in-memory module: some layer is offloaded or layers are spread over
    several devices (then use :class:`pgprune.core.masked_forward.MaskedModel`, which executes layer by layer)."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        return False
    homes, devices = layer_homes(model)
    return any(h != "resident" for h in homes) or len({str(d) for d in devices}) > 1 or (
        bool(devices) and devices[0] != main_device(model))


def require_in_memory(model, what: str) -> None:
    """Raise a clear error for code that needs every weight in memory (gradients, the HF forward)."""
    if is_streamed(model):
        raise PgpruneError(f"{what} needs the whole model in memory on one device (it runs the Hugging Face forward"
                           " with gradients); it does not work with model.offload cpu/disk or device_map auto. Use a "
                           "scorer without gradients (wanda_sp, flap, magnitude, shortgpt) or offload: none")


# --- weightless layer copies --------------------------------------------------------------------------------------
def meta_clone(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are on ``meta`` (no weight is copied)."""
    memo = {}
    for t in module.parameters():
        memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


class _OneLayer:
    """Stands in for the adapter's layer list so that ``adapter.parts(i)`` finds a given module at index i."""

    def __init__(self, i: int, layer: nn.Module, n: int):
        self.i, self.layer, self.n = i, layer, n

    def __getitem__(self, j):
        if j != self.i:
            raise IndexError(j)
        return self.layer

    def __len__(self):
        return self.n


def parts_of(adapter: Adapter, i: int, layer: nn.Module) -> LayerParts:
    """The adapter's LayerParts of ``layer`` taken as decoder layer ``i`` (family names from the adapter)."""
    a = copy.copy(adapter)
    n = len(adapter.layers())
    a.layers = lambda: _OneLayer(i, layer, n)
    return a.parts(i)


class _Slot:
    """Weightless copy of decoder layer i; :meth:`fill` swaps in real tensors, :meth:`clear` puts meta back."""

    def __init__(self, adapter: Adapter, i: int):
        layer = adapter.layers()[i]
        self.module = meta_clone(layer)
        self.params = {n: (self.module.get_submodule(n.rpartition(".")[0]) if "." in n else self.module,
                           n.rpartition(".")[2], p) for n, p in self.module.named_parameters()}
        self.parts = parts_of(adapter, i, self.module)

    def fill(self, tensors: dict[str, torch.Tensor]) -> LayerParts:
        for n, (mod, attr, meta) in self.params.items():
            t = tensors[n]
            if t.shape != meta.shape:
                raise PgpruneError(f"tensor {n} has shape {tuple(t.shape)}, the model expects {tuple(meta.shape)}")
            mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
        return self.parts

    def clear(self) -> None:
        for mod, attr, meta in self.params.values():
            mod._parameters[attr] = meta


@dataclass
class _Loaded:
    """A loaded layer: its tensors, the CUDA event ending their copy (or None), what hands its buffer back."""

    tensors: dict[str, torch.Tensor]
    event: object = None
    _release: object = None

    def release(self) -> None:
        self.tensors = {}
        if self._release is not None:
            self._release()
            self._release = None


# --- the per-executor weight source --------------------------------------------------------------------------------
class WeightSource:
    """Loads decoder layers for one executor (a :class:`~pgprune.core.masked_forward.MaskedModel`).

    ``layer(i, next_i)`` is a context manager giving layer i's LayerParts with real tensors on ``devices[i]`` and
    starting to load ``next_i`` in the background; the tensors of a streamed layer are dropped when it exits.
    """

    def __init__(self, model, adapter: Adapter | None = None, device: torch.device | str | None = None,
                 prefetch: bool = True):
        self.model = model
        self.adapter = adapter or get_adapter(model)
        self.plc = placement(model)
        self.homes, self.devices = layer_homes(model, self.adapter, device)
        self.main = normalize_device(device) if device is not None else main_device(model, self.adapter)
        self.streamed = any(h != "resident" for h in self.homes)
        self._layers = self.adapter.layers()
        self._prefixes = _layer_prefixes(model, self.adapter) if "disk" in self.homes else None
        if "disk" in self.homes and (self.plc is None or self.plc.reader is None):
            raise PgpruneError("the model's decoder layers are on the meta device but it carries no safetensors "
                               "reader; load it with pgprune.hf.loading.load_model(..., offload='disk')")
        self._slots: dict[int, _Slot] = {}
        self._resident = {i: self.adapter.parts(i) for i, h in enumerate(self.homes) if h == "resident"}
        self._pending: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pgprune-load") if (self.streamed and prefetch) else None
        self._streams: dict[str, torch.cuda.Stream] = {}
        self._lock = threading.Lock()
        # staging buffers for disk reads: one per layer in flight (running + loaded ahead), reused every step
        self._staging: queue.Queue = queue.Queue()
        self._staging_made = 0
        self._staging_max = 2 if self._pool is not None else 1
        self._staging_bytes = 0
        if "disk" in self.homes:
            self._staging_bytes = max(self.plc.reader.staging_bytes([self._prefixes[i] + n for n, _ in
                                                                     self._layers[i].named_parameters()])
                                      for i, h in enumerate(self.homes) if h == "disk")

    # loading ----------------------------------------------------------------------------------------------------
    def _slot(self, i: int) -> _Slot:
        with self._lock:
            if i not in self._slots:
                self._slots[i] = _Slot(self.adapter, i)
            return self._slots[i]

    def _copy_stream(self, dev: torch.device):
        key = str(dev)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device=dev)
        return self._streams[key]

    def _take_staging(self, pin: bool) -> torch.Tensor:
        with self._lock:
            if self._staging.empty() and self._staging_made < self._staging_max:
                self._staging_made += 1
                return torch.empty(self._staging_bytes, dtype=torch.uint8, pin_memory=pin)
        return self._staging.get()

    def _load(self, i: int, device: torch.device | None = None, staged: bool = True) -> "_Loaded":
        """Layer i's tensors on ``device`` (default devices[i]) in the model's dtype.

        Disk layers are read into a reused staging buffer (pinned for a GPU); on a GPU the host-to-device copies
        run on a side stream and the buffer is handed back once they are done; on the CPU the tensors are views of
        the buffer, handed back when the layer is released. ``staged=False``: fresh memory the caller keeps."""
        slot = self._slot(i)
        dev = self.devices[i] if device is None else device
        cuda = dev.type == "cuda"
        buf = None
        if self.homes[i] == "disk":
            prefix = self._prefixes[i]
            if staged:
                buf = self._take_staging(pin=cuda)
            cpu = self.plc.reader.read([prefix + n for n in slot.params], pin=cuda and not staged, into=buf)
            cpu = {n: cpu[prefix + n] for n in slot.params}
        else:
            cpu = {n: p.detach() for n, p in self._layers[i].named_parameters()}
        dtypes = {n: meta.dtype for n, (_, _, meta) in slot.params.items()}
        if not cuda:
            out = {n: t.to(dev, dtypes[n]) for n, t in cpu.items()}
            return _Loaded(out, None, (lambda: self._staging.put(buf)) if buf is not None else None)
        stream = self._copy_stream(dev)
        with torch.cuda.device(dev), torch.cuda.stream(stream):
            out = {n: t.to(dev, non_blocking=True).to(dtypes[n]) for n, t in cpu.items()}
            event = torch.cuda.Event()
            event.record(stream)
        if buf is not None:
            event.synchronize()  # the staging buffer is free once its copies are done (this is the loader thread)
            self._staging.put(buf)
        return _Loaded(out, event, None)

    @contextmanager
    def layer(self, i: int, next_i: int | None = None):
        if self.homes[i] == "resident":
            if next_i is not None:
                self.prefetch(next_i)
            yield self._resident[i]
            return
        fut = self._pending.pop(i, None)
        if self._pending:  # loads ahead that this order will not use hold staging buffers: drop them
            self.release()
        if fut is None and self._pool is not None:
            fut = self._pool.submit(self._load, i)  # keep all loads on the loader thread (staging order)
        loaded = fut.result() if fut is not None else self._load(i)
        if next_i is not None:
            self.prefetch(next_i)
        if loaded.event is not None:
            cur = torch.cuda.current_stream(self.devices[i])
            cur.wait_event(loaded.event)
            for t in loaded.tensors.values():
                t.record_stream(cur)
        slot = self._slot(i)
        try:
            yield slot.fill(loaded.tensors)
        finally:
            slot.clear()
            loaded.release()

    def prefetch(self, i: int) -> None:
        if self._pool is None or self.homes[i] == "resident" or i in self._pending:
            return
        self._pending[i] = self._pool.submit(self._load, i)

    def release(self) -> None:
        """Drop layers loaded ahead and not used (after an interrupted sweep)."""
        for f in self._pending.values():
            if not f.cancel():
                try:
                    f.result().release()
                except Exception:  # noqa: BLE001 - a failed load holds nothing
                    pass
        self._pending.clear()

    def materialized(self, i: int, device: torch.device | str | None = None) -> LayerParts:
        """LayerParts of layer i holding real tensors on ``device`` (default: where it runs): the module itself for a
        resident layer, else a fresh copy of the layer (kept alive by the returned parts, freed with them)."""
        if self.homes[i] == "resident" and (device is None or torch.device(device) == self.devices[i]):
            return self._resident[i]
        dev = torch.device(device) if device is not None else self.devices[i]
        loaded = self._load(i, dev, staged=False)
        if loaded.event is not None:
            loaded.event.synchronize()
        module = meta_clone(self._layers[i])
        for n, t in loaded.tensors.items():
            mod = module.get_submodule(n.rpartition(".")[0]) if "." in n else module
            mod._parameters[n.rpartition(".")[2]] = nn.Parameter(t, requires_grad=False)
        return parts_of(self.adapter, i, module)

    def close(self) -> None:
        self.release()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def _layer_prefixes(model, adapter: Adapter) -> list[str]:
    """Qualified name prefix ('model.layers.3.') of every decoder layer: its tensors' names in the checkpoint."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for layer in adapter.layers():
        if id(layer) not in names:
            raise PgpruneError("a decoder layer is not a submodule of the model; cannot name its checkpoint tensors")
        out.append(names[id(layer)] + ".")
    return out


def layer_parts(model, i: int, device: torch.device | str | None = None) -> LayerParts:
    """Layer i's parts with real weights, for code that reads weights layer by layer (scorers, slicing).

    A layer held on its compute device (every layer of an in-memory model): ``adapter.parts(i)`` itself, no copy.
    An offloaded layer (offload cpu/disk, device_map cpu/disk): a copy of it on ``device`` (default the CPU, where
    scorers and slicing build their results) that lives as long as the returned parts.
    """
    adapter = get_adapter(model)
    homes, devices = layer_homes(model, adapter)
    if homes[i] == "resident" and (device is None or torch.device(device) == devices[i]):
        return adapter.parts(i)
    src = WeightSource(model, adapter, prefetch=False)
    try:
        return src.materialized(i, torch.device(device) if device is not None else torch.device("cpu"))
    finally:
        src.close()
