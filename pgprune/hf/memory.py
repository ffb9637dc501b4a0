"""Memory: measured peaks (CUDA allocator / process RSS) and a plan of what a search needs, from the config alone.

:func:`plan` builds the model on the ``meta`` device (no weight is read or allocated) to count the bytes of the
weights, of each decoder layer and of what sits outside the layers (embeddings, lm_head, final norm), then
estimates the search's peak on the compute device and in host memory for each placement:

* ``offload none``: all weights on the device + one gathered layer copy + activations;
* ``offload cpu``: outside-layer weights + two layers (the running one and the one loaded ahead) + gathered copy +
  activations on the device; all layer weights in (pinned) host memory;
* ``offload disk``: the same on the device; host memory holds only the two layers in flight (the rest is read
  from the safetensors files per step);
* ``device_map`` over N GPUs: the layers split evenly, the outside-layer weights on the first GPU, activations
  on each.

Activations (search step, layer-major): the hidden states of all K samples (K*B*T*d, twice while a layer updates
them), the largest per-layer transient of the rows computed together (B rows per sample in ``separate`` mode,
K*B rows in ``batched``: q/k/v/attention output, the MLP's gate/up/product at full width as an upper bound, the
attention matrix T*T per head when the math attention kernel is used (CPU); GPUs use flash/memory-efficient SDPA),
and the float32 logits of one chunk of 256 tokens, plus 64 MiB of cuBLAS workspaces on a GPU. The estimate is an upper bound of the allocator's peak, not of
fragmentation; :func:`format_plan` prints it as a markdown table.
"""
from __future__ import annotations

import resource
from pathlib import Path

import torch

from pgprune.errors import PgpruneError

_GIB = 2 ** 30
CUDA_WORKSPACE = 64 * 2 ** 20  # cuBLAS/cuBLASLt workspaces, allocated through torch's allocator (~36 MiB on an H100)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# --- measured peaks ---------------------------------------------------------------------------------------------
def proc_status(key: str) -> int | None:
    """A byte field of this process's /proc/self/status (e.g. ``"VmRSS:"``, ``"RssAnon:"``); None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_memory(device: str | torch.device = "cpu") -> int:
    """Bytes in use now: CUDA memory allocated by torch on ``device``, or this process's resident set (CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    rss = proc_status("VmRSS:")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(device: str | torch.device = "cpu") -> int:
    """Peak bytes since the last :func:`reset_peak_memory`: ``torch.cuda.max_memory_allocated`` on a GPU, the peak
    resident set (VmHWM) of this process on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = proc_status("VmHWM:")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory(device: str | torch.device = "cpu") -> bool:
    """Start a new peak: CUDA peak stats, or (Linux) the process's VmHWM via /proc/self/clear_refs. False when the
    platform cannot reset it (then :func:`peak_memory` is the peak since the process started)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- plan from the config ----------------------------------------------------------------------------------------
def _config(source_or_config):
    """The config only, never the weights: a config object as is; ``embedded:...`` from its GGUF file's header
    (:func:`pgprune.hf.loading.embedded_config`, nothing converted); a folder or hub id by AutoConfig."""
    if not isinstance(source_or_config, (str, Path)):
        return source_or_config
    from transformers import AutoConfig

    from pgprune.hf.loading import EMBEDDED, embedded_config, resolve, trust_remote_code

    if str(source_or_config).startswith("embedded:"):
        if str(source_or_config) not in EMBEDDED:
            raise PgpruneError(f"unknown embedded model {str(source_or_config)!r}; allowed: {', '.join(EMBEDDED)}, "
                               "a folder or a hub id")
        return embedded_config(str(source_or_config))
    src = resolve(source_or_config)
    try:
        return AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code(src))
    except (OSError, ValueError) as e:
        raise PgpruneError(f"could not read the config of {source_or_config!r}: {e}. Offline, a hub id works only "
                           "when its config is in the Hugging Face cache; a local folder needs config.json") from e


def weight_sizes(source_or_config, dtype: str = "bfloat16") -> dict:
    """Bytes of the weights in ``dtype``: total, per decoder layer, outside the layers; from a meta-device build."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from pgprune.core.adapters import adapter_class, get_adapter

    if dtype not in DTYPE_BYTES:
        raise PgpruneError(f"dtype={dtype!r} is not allowed; allowed: {sorted(DTYPE_BYTES)}")
    config = _config(source_or_config)
    adapter_class(config)
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    s = DTYPE_BYTES[dtype]
    adapter = get_adapter(model)
    layers = [sum(p.numel() for p in layer.parameters()) * s for layer in adapter.layers()]
    total = sum(p.numel() for p in model.parameters()) * s  # tied weights once
    layout = adapter.layout()
    return {"config": config, "layout": layout, "weights": total, "layers": layers, "outside": total - sum(layers),
            "params": total // s}


def _activations(cfg, layout, dtype_bytes: int, batch: int, seq_len: int, samples: int, batched: bool,
                 math_attention: bool, chunk: int = 256) -> int:
    d = layout.hidden_size
    heads = layout.group_size * max(layout.kv_heads)
    q_width = heads * layout.head_dim
    kv_width = max(layout.kv_heads) * layout.head_dim
    ffn = max(layout.intermediate)
    vocab = int(cfg.vocab_size)
    tokens = batch * seq_len
    rows = tokens * (samples if batched else 1)  # tokens computed together in one layer call
    hidden = 2 * samples * tokens * d * dtype_bytes
    attn = rows * (3 * q_width + 2 * kv_width + 2 * d) * dtype_bytes
    if math_attention:
        attn += (samples if batched else 1) * batch * heads * seq_len * seq_len * (dtype_bytes + 1)
    mlp = rows * (4 * ffn + d) * dtype_bytes
    logits = chunk * vocab * (dtype_bytes + 4 + 4)
    norm = samples * tokens * d * dtype_bytes  # final norm of one group's rows
    return hidden + max(attn, mlp) + max(logits, norm)


def plan(source_or_config, dtype: str = "bfloat16", offload: str = "none", device_map: str = "none",
         batch: int = 8, seq_len: int = 128, samples: int = 4, sample_mode: str = "auto", device: str = "cuda",
         gpus: int = 1, gpu_memory: str | int | None = None) -> dict:
    """Memory a search needs, without loading weights. Returns a dict with ``weights``/``layer``/``outside`` bytes
    and ``rows``: one per placement (offload none, cpu, disk, and device_map auto over ``gpus`` GPUs), each with
    ``device_peak`` (per GPU), ``host`` and ``disk`` bytes and ``fits`` (device_peak <= ``gpu_memory``, when
    given). ``selected`` names the row of the given ``offload`` / ``device_map``."""
    from pgprune.hf.loading import DEVICE_MAPS, OFFLOADS

    if offload not in OFFLOADS:
        raise PgpruneError(f"offload={offload!r} is not allowed; allowed: {OFFLOADS}")
    if device_map not in DEVICE_MAPS:
        raise PgpruneError(f"device_map={device_map!r} is not allowed; allowed: {DEVICE_MAPS}")
    if sample_mode not in ("auto", "batched", "separate"):
        raise PgpruneError(f"sample_mode={sample_mode!r} is not allowed; allowed: auto, batched, separate")
    for name, v in (("batch", batch), ("seq_len", seq_len), ("samples", samples), ("gpus", gpus)):
        if not isinstance(v, int) or v < 1:
            raise PgpruneError(f"{name} must be a positive integer; got {v!r}")
    sizes = weight_sizes(source_or_config, dtype)
    cfg, layout = sizes["config"], sizes["layout"]
    s = DTYPE_BYTES[dtype]
    on_gpu = str(device).startswith("cuda")
    batched = sample_mode == "batched" or (sample_mode == "auto" and on_gpu)
    act = _activations(cfg, layout, s, batch, seq_len, samples, batched, math_attention=not on_gpu)
    if on_gpu:
        act += CUDA_WORKSPACE
    layer = max(sizes["layers"]) if sizes["layers"] else 0
    weights, outside = sizes["weights"], sizes["outside"]
    gathered = layer  # gathered copies of the kept rows/columns: at most one layer
    cap = _bytes(gpu_memory) if gpu_memory is not None else None
    rows = {
        "offload none": {"device_peak": weights + gathered + act, "host": 0, "disk": 0},
        "offload cpu": {"device_peak": outside + 2 * layer + gathered + act, "host": weights - outside, "disk": 0},
        "offload disk": {"device_peak": outside + 2 * layer + gathered + act, "host": 2 * layer,
                         "disk": weights},
    }
    n_layers = layout.num_layers
    per_gpu = -(-n_layers // gpus) * layer
    rows[f"device_map auto ({gpus} GPU{'s' if gpus > 1 else ''})"] = {
        "device_peak": outside + per_gpu + gathered + act, "host": 0, "disk": 0}
    for r in rows.values():
        r["fits"] = None if cap is None else r["device_peak"] <= cap
    selected = f"offload {offload}" if device_map == "none" else next(k for k in rows if k.startswith("device_map"))
    return {"model": str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "")), "dtype": dtype,
            "params": sizes["params"], "weights": weights, "layer": layer, "layers": n_layers, "outside": outside,
            "activations": act, "batch": batch, "seq_len": seq_len, "samples": samples,
            "sample_mode": "batched" if batched else "separate", "device": device, "gpus": gpus,
            "gpu_memory": cap, "rows": rows, "selected": selected}


def _bytes(v) -> int:
    if isinstance(v, int):
        return v
    text = str(v).strip().upper().replace("IB", "B")
    for unit, mult in (("TB", 2 ** 40), ("GB", 2 ** 30), ("MB", 2 ** 20), ("KB", 2 ** 10), ("B", 1)):
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * mult)
            except ValueError:
                break
    raise PgpruneError(f"memory size {v!r} is not understood; write e.g. '80GiB', '512MB' or a number of bytes")


def _fmt(n: int | None) -> str:
    if n is None:
        return "-"
    if n == 0:
        return "0"
    if n >= _GIB:
        return f"{n / _GIB:.2f} GiB"
    return f"{n / 2 ** 20:.1f} MiB"


def format_plan(d: dict) -> str:
    """Markdown: the model's sizes, then one row per placement (the selected one marked)."""
    lines = [f"model {d['model']}: {d['params'] / 1e9:.2f}B parameters, {d['layers']} layers, {d['dtype']}; "
             f"weights {_fmt(d['weights'])}, one decoder layer {_fmt(d['layer'])}, outside the layers "
             f"{_fmt(d['outside'])}; search activations ({d['samples']} samples x {d['batch']} x {d['seq_len']} "
             f"tokens, {d['sample_mode']}) {_fmt(d['activations'])}", "",
             "| placement | peak per GPU | host memory | disk | fits |", "|---|---|---|---|---|"]
    for name, r in d["rows"].items():
        mark = " (selected)" if name == d["selected"] else ""
        fits = "-" if r["fits"] is None else ("yes" if r["fits"] else "no")
        lines.append(f"| {name}{mark} | {_fmt(r['device_peak'])} | {_fmt(r['host'])} | {_fmt(r['disk'])} | {fits} |")
    return "\n".join(lines)
