"""Placing a model over several devices, and splitting a step's samples over devices.

* :func:`auto_device_map`: accelerate's ``infer_auto_device_map`` on the weightless model (the decoder layer class
  is never split), resolved to one home per module: a GPU, ``cpu`` or ``disk``. :func:`pgprune.hf.loading.load_model`
  materialises each layer where its home is; the executor (:class:`pgprune.core.masked_forward.MaskedModel`) runs a GPU
  layer where it is, streams ``cpu``/``disk`` layers to the compute device, and moves the hidden states along.
* :func:`replicate` and :class:`ParallelSampleLosses`: data parallelism over the K samples of a search step. One
  replica (and executor) per device, the K masks are split into contiguous chunks, each device evaluates its chunk
  on the same batch in its own thread, only the losses come back (``search.devices``).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from pgprune.core.adapters import get_adapter
from pgprune.core.masks import Masks
from pgprune.errors import PgpruneError


def _resolve_devices_key(key):
    if isinstance(key, str) and key.isdigit():
        return int(key)
    return key


def auto_device_map(model: nn.Module, dtype: torch.dtype, max_memory: dict | None = None) -> dict[str, str | int]:
    """accelerate's device map of a (meta) model: {module name: GPU index | 'cpu' | 'disk'}.

    ``max_memory``: {'0': '20GiB', 'cpu': '60GiB', ...} (keys may be strings as in params.yaml); None: what
    accelerate finds free. Layers that fit no GPU go to 'cpu', then to 'disk'.
    """
    from accelerate import infer_auto_device_map

    adapter = get_adapter(model)
    layer_cls = type(adapter.layers()[0]).__name__
    mm = {_resolve_devices_key(k): v for k, v in (max_memory or {}).items()} or None
    return dict(infer_auto_device_map(model, max_memory=mm, no_split_module_classes=[layer_cls], dtype=dtype))


def home_of(name: str, device_map: dict) -> str | int:
    """The home of module ``name`` under ``device_map`` (longest matching prefix; '' matches everything)."""
    best, home = -1, None
    for k, v in device_map.items():
        if k == "" or name == k or name.startswith(k + "."):
            if len(k) > best:
                best, home = len(k), v
    if home is None:
        raise PgpruneError(f"the device map places no module containing {name!r}")
    return home


def home_device(home, compute: torch.device) -> torch.device:
    """Where a module of this home is held: its GPU, CPU memory, or None for disk."""
    if isinstance(home, int):
        return torch.device("cuda", home)
    if home in ("cpu", "disk"):
        return torch.device(home) if home == "cpu" else None
    return torch.device(home)


# --- data parallel over samples ------------------------------------------------------------------------------------
def replicate(model: nn.Module, device: str | torch.device) -> nn.Module:
    """The model on ``device`` without touching the original: the model itself when it is already there (or
    streamed: a streamed model's replica shares the weights' home and only runs elsewhere), else a copy made
    tensor by tensor (no intermediate full copy on the source device)."""
    from pgprune.core.weights import Placement, attach, meta_clone, normalize_device, placement

    device = torch.device(device)
    plc = placement(model)
    params = list(model.parameters())
    if plc is None and all(p.device == device for p in params):
        return model
    clone = meta_clone(model)
    src_p = dict(model.named_parameters(remove_duplicate=False))
    src_b = dict(model.named_buffers(remove_duplicate=False))
    done: dict[int, nn.Parameter] = {}
    layer_ids = {id(t) for layer in get_adapter(model).layers() for t in layer.parameters()}
    for name, p in src_p.items():
        mod_name, _, attr = name.rpartition(".")
        mod = clone.get_submodule(mod_name) if mod_name else clone
        if id(p) not in done:
            # streamed replicas leave offloaded layers where they are (read by their own executor)
            keep_home = plc is not None and id(p) in layer_ids and (
                p.device.type in ("meta", "cpu") or p.device != normalize_device(plc.compute_device))
            t = p.detach() if keep_home else p.detach().to(device)
            done[id(p)] = nn.Parameter(t, requires_grad=False)
        mod._parameters[attr] = done[id(p)]
    for name, b in src_b.items():
        mod_name, _, attr = name.rpartition(".")
        mod = clone.get_submodule(mod_name) if mod_name else clone
        mod._buffers[attr] = b.to(device)
    if plc is not None:
        attach(clone, Placement(device, plc.reader, dict(plc.device_map), plc.pin, plc.stream_resident))
    clone.eval()
    return clone


class ParallelSampleLosses:
    """``sample_losses`` with the K masks split over several executors (one per device), run in threads.

    ``executors``: MaskedModels, one per device (see :meth:`from_model`). The result equals one executor's
    ``sample_losses`` on all K masks (separate mode: bit for bit per sample; batched: up to the rounding of each
    chunk's union).
    """

    def __init__(self, executors):
        if not executors:
            raise PgpruneError("ParallelSampleLosses needs at least one executor (search.devices is empty)")
        self.executors = list(executors)
        self.layout = self.executors[0].layout
        self._pool = ThreadPoolExecutor(len(self.executors), thread_name_prefix="pgprune-dp")

    @classmethod
    def from_model(cls, model: nn.Module, devices: list[str], **kwargs) -> "ParallelSampleLosses":
        from pgprune.core.masked_forward import MaskedModel

        if not devices:
            raise PgpruneError("search.devices is empty; give at least one device (e.g. ['cuda:0', 'cuda:1'])")
        return cls([MaskedModel(replicate(model, d), device=d, **kwargs) for d in devices])

    @property
    def device(self) -> torch.device:
        return self.executors[0].device

    def set_compensation(self, means) -> None:
        for e in self.executors:
            e.set_compensation(means)

    def loss(self, *args, **kwargs) -> float:
        """One mask's loss (validation) on the first device."""
        return self.executors[0].loss(*args, **kwargs)

    def sample_losses(self, input_ids: torch.Tensor, masks: list[Masks], mode: str = "auto") -> torch.Tensor:
        k, n = len(masks), len(self.executors)
        if k == 0:
            return torch.zeros(0, dtype=torch.float64)
        sizes = [k // n + (1 if j < k % n else 0) for j in range(n)]
        chunks, s = [], 0
        for size in sizes:
            chunks.append(masks[s:s + size])
            s += size
        futures = [self._pool.submit(e.sample_losses, input_ids, c, mode)
                   for e, c in zip(self.executors, chunks) if c]
        return torch.cat([f.result() for f in futures])

    __call__ = sample_losses

    def close(self) -> None:
        self._pool.shutdown(wait=True)
