"""GGUF export of a pruned model for llama.cpp, as its ``deci`` architecture (per-layer head counts and FFN widths).

llama.cpp's ``deci`` graph (src/models/deci.cpp, the DeciLM / Llama-3_1-Nemotron-NAS models) is the Llama layer
with three per-layer hyper-parameters read as arrays: ``deci.attention.head_count``,
``deci.attention.head_count_kv`` and ``deci.feed_forward_length`` (one entry per decoder layer), and optional
``attn_output.bias`` / ``ffn_down.bias`` tensors, which is what pgprune's heterogeneous (and uniform) models are:
every kept layer keeps its own number of KV groups (x G query heads) and MLP channels, and mean compensation or the
refit adds o_proj/down_proj biases. So one file format serves both layouts, without a converter of llama.cpp's own
(its ``DeciModel`` reads NVIDIA's ``block_configs`` only).

What is written (gguf-py's :class:`gguf.GGUFWriter`):

* hyper-parameters: context length, embedding length, block count, the three per-layer arrays, key/value length
  and rope dimension = head_dim (llama.cpp otherwise derives head_dim from layer 0's head count, which pruning
  changes), rope base, RMS-norm epsilon, ``general.file_type``;
* tensors: ``token_embd``, ``output_norm``, ``output`` (unless tied), per layer ``attn_norm``, ``attn_q/k/v/output``
  (+ their biases), ``ffn_norm``, ``ffn_gate/up/down`` (+ their biases); biases that are all zero (the zero q/k/v
  biases of a compensated uniform Llama layer) are left out. q_proj/k_proj rows (and biases) are permuted head by
  head from transformers' rotate-half RoPE layout to llama.cpp's adjacent-pair layout
  (``w.reshape(n, 2, hd/2, ...).swapaxes(1, 2)``), like convert_hf_to_gguf.py;
* Llama-3 RoPE scaling (``rope_type: llama3``): the ``rope_freqs`` tensor of per-frequency divisors, computed like
  convert_hf_to_gguf.py's ``LlamaModel.generate_extra_tensors``;
* dtypes like convert_hf_to_gguf.py's ``--outtype``: 1-D tensors (norms, biases, rope_freqs) float32; matrices
  float32, float16, bfloat16 or q8_0 (gguf-py's quantizer; a matrix whose rows are not a multiple of 32 long is
  float16 instead, as the converter falls back);
* the tokenizer from ``tokenizer.json`` (byte-level BPE as ``gpt2``, its special tokens as CONTROL) with merges,
  special ids and the chat template (:class:`gguf.SpecialVocab`);
* model-card metadata when the folder has pgprune's ``README.md`` / ``masks.json``: ``general.name``,
  ``general.base_model.*``, ``general.description`` and ``pgprune.method`` / ``pgprune.sparsity`` /
  ``pgprune.version``.

Shapes the ``deci`` graph runs differently from transformers, rewritten exactly:

* a layer without attention heads: llama.cpp skips its attention and ignores its ``attn_output.bias``, while
  transformers adds the o_proj bias (a constant) to the residual; the constant is folded into the previous written
  layer's ``ffn_down.bias`` (created if absent);
* a layer without MLP channels: with ``feed_forward_length`` 0 llama.cpp skips the whole layer, attention output
  included, so it is written with a zero MLP of width 1 (zero gate/up/down weights, SiLU(0) * 0 = 0) carrying the
  layer's down_proj bias;
* a layer with neither: left out of the file; its o_proj/down_proj biases are folded into the previous written
  layer's ``ffn_down.bias``, or into every ``token_embd`` row when no layer is written before it (``output`` is
  then written separately even when tied).

q/k/v biases of pruned heads (Qwen2) are written at the layer's width, as llama.cpp's ``create_tensor_qkv``
declares them (llama-cpp-python 0.3.36; older builds declared ``attn_q.bias`` at full width and do not load such a
file). transformers' ``seed_oss`` (the uniform layout's Llama layer when LlamaConfig refuses the head count) is
written as the Llama layer it is.

Refused, naming the layer or value: a first written layer without heads (llama.cpp reads the head size from the
first layer's head count: with 0 it takes head size 0 and the later layers' attn_q does not load), sliding-window
attention, RoPE scaling other than ``llama3``, activations other than SiLU.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pgprune.core.adapters import get_adapter
from pgprune.errors import PgpruneError

ARCH = "deci"
# dtype -> (gguf.GGMLQuantizationType of the matrices, gguf.LlamaFileType of general.file_type)
DTYPES = {"float32": ("F32", "ALL_F32"), "float16": ("F16", "MOSTLY_F16"), "bfloat16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
FILE_TYPES = {"float32": 0, "float16": 1, "bfloat16": 32, "q8_0": 7}  # the LlamaFileType values of DTYPES
ROPE_TYPES = ("default", "llama3")
Q8_BLOCK = 32  # values per q8_0 block: a row must be a multiple of it long


def _rope_rows(w: torch.Tensor, hd: int) -> torch.Tensor:
    """Rows of a q/k weight [n*hd, in] or bias [n*hd] from rotate-half to adjacent-pair RoPE order."""
    n = w.shape[0] // hd
    return w.reshape(n, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(config) -> tuple[str, dict]:
    """(rope type, its parameters incl. rope_theta) from ``rope_parameters`` (transformers 5) or ``rope_scaling``."""
    rp = getattr(config, "rope_parameters", None)
    rp = rp if isinstance(rp, dict) else {}
    rp = rp.get("full_attention", rp) if isinstance(rp.get("full_attention"), dict) else rp
    scaling = getattr(config, "rope_scaling", None)
    scaling = scaling if isinstance(scaling, dict) else {}
    params = {**scaling, **rp}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise PgpruneError(f"RoPE scaling {kind!r} is not supported by the GGUF (deci) export; allowed: "
                           f"{', '.join(ROPE_TYPES)}")
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    return kind, params


def rope_freq_factors(params: dict, hd: int) -> torch.Tensor:
    """Llama-3 RoPE scaling as llama.cpp's ``rope_freqs`` [hd/2]: the divisor of each base frequency (1 for high
    frequencies, ``factor`` for low ones, smoothly in between), as convert_hf_to_gguf.py computes it."""
    base = float(params.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))  # [hd/2]
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old = float(params.get("original_max_position_embeddings", 8192))
    if low == high:
        raise PgpruneError(f"llama3 RoPE scaling with low_freq_factor == high_freq_factor ({low}); allowed: "
                           "different values (transformers and llama.cpp divide by their difference)")
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def family_adapter(model):
    """The model's family adapter; transformers' ``seed_oss`` (the uniform layout's Llama layer when LlamaConfig
    refuses the head count, :mod:`pgprune.hf.export`) has the Llama layer's modules and math: the Llama adapter."""
    if getattr(model.config, "model_type", None) == "seed_oss":
        from pgprune.core.adapters.llama import LlamaAdapter

        return LlamaAdapter(model)
    return get_adapter(model)


def layer_shapes(model) -> list[dict]:
    """Per decoder layer of ``model``: heads, kv_heads, ff (channels) and which biases it has."""
    adapter = family_adapter(model)
    hd = adapter.head_dim()
    out = []
    for i in range(len(adapter.layers())):
        p = adapter.parts(i)
        out.append({"heads": p.q_proj.out_features // hd, "kv_heads": p.k_proj.out_features // hd,
                    "ff": p.gate_proj.out_features, "o_bias": p.o_proj.bias is not None,
                    "down_bias": p.down_proj.bias is not None, "q_bias": p.q_proj.bias is not None})
    return out


@dataclass
class _Block:
    """One layer as written: ``src`` its index in the model; ``ff`` 1 with ``zero_mlp`` for an MLP-free layer;
    ``down_bias`` float32 [hidden] or None (the layer's own plus the constants folded into it)."""

    src: int
    heads: int
    kv_heads: int
    ff: int
    zero_mlp: bool
    down_bias: torch.Tensor | None


def _bias(linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().to("cpu", torch.float32)


def add_bias(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """a + b where either may be None (no bias); never an alias of ``b``."""
    if b is None:
        return a
    return b.clone() if a is None else a + b


class ResidualFold:
    """Moves the constant output of something the engine does not compute (a layer left out, an o_proj bias of a
    layer without attention) exactly onto an earlier bias of the residual stream: the previous written layer's,
    which ``attach(prev, const)`` adds it to and names, or before any written layer the token embeddings
    (``shift``, added to every embedding row, called ``embed_name`` in the notes)."""

    def __init__(self, attach, embed_name: str, notes: list[str]):
        self.shift: torch.Tensor | None = None
        self._attach, self._embed, self._notes = attach, embed_name, notes

    def __call__(self, blocks: list, const: torch.Tensor | None, what: str) -> None:
        if const is None:
            return
        if blocks:
            self._notes.append(f"{what} folded into {self._attach(blocks[-1], const)}")
        else:
            self.shift = add_bias(self.shift, const)
            self._notes.append(f"{what} folded into {self._embed}")


def plan_blocks(model) -> tuple[list[_Block], torch.Tensor | None, list[str]]:
    """(the written layers, the constant [hidden] added to every token embedding or None, notes on what was
    rewritten); refuses a first written layer without heads and a model that keeps no layer."""
    adapter = family_adapter(model)
    shapes = layer_shapes(model)
    blocks: list[_Block] = []
    notes: list[str] = []

    def attach(prev: _Block, const: torch.Tensor) -> str:
        prev.down_bias = add_bias(prev.down_bias, const)
        return f"layer {prev.src}'s ffn_down.bias"

    fold = ResidualFold(attach, "token_embd", notes)

    for i, s in enumerate(shapes):
        p = adapter.parts(i)
        o_bias = _bias(p.o_proj) if s["heads"] == 0 else None
        if s["heads"] == 0 and s["ff"] == 0:
            down = _bias(p.down_proj)
            const = o_bias if down is None else (down if o_bias is None else o_bias + down)
            fold(blocks, const, f"layer {i} (no head, no channel: left out): its constant output")
            continue
        if s["heads"] == 0:
            if not blocks:
                raise PgpruneError(f"layer {i} keeps no attention head and is the first layer written; llama.cpp's "
                                   "deci reads the head size from the first layer's head count (0: head size 0, no "
                                   "later attention layer loads); allowed: a first kept layer with >= 1 KV group")
            fold(blocks, o_bias, f"layer {i} (no head): its o_proj bias")
        if s["ff"] == 0:
            notes.append(f"layer {i} (no channel): a zero MLP of width 1 carries its down_proj bias")
        blocks.append(_Block(i, s["heads"], s["kv_heads"], max(s["ff"], 1), s["ff"] == 0, _bias(p.down_proj)))
    if not blocks:
        raise PgpruneError("the model keeps no layer with an attention head or an MLP channel; allowed: at least "
                           "one such layer")
    return blocks, fold.shift, notes


def _check(model) -> None:
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < getattr(cfg, "max_position_embeddings", 0):
        raise PgpruneError(f"sliding-window attention (window {window}) is not supported by llama.cpp's deci "
                           "architecture; the GGUF export needs full attention")
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise PgpruneError(f"hidden_act={act!r}; llama.cpp's deci MLP is SwiGLU, allowed: silu")
    _rope(cfg)


def _metadata(w, cfg, folder: Path) -> dict:
    import pgprune

    from pgprune.hf.folder_meta import card_metadata

    meta = card_metadata(folder)
    base = meta.get("base_model")
    src = str(getattr(cfg, "_name_or_path", "") or "")
    name = meta.get("name") or (f"{base.rsplit('/', 1)[-1]} (pruned)" if base else None) or \
        (Path(src).name if src else "pgprune-pruned")
    w.add_name(name)
    if base:
        w.add_base_model_count(1)
        w.add_base_model_name(0, base)
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", base) and not Path(base).exists():
            w.add_base_model_repo_url(0, f"https://huggingface.co/{base}")
    if meta.get("method") or meta.get("sparsity") is not None:
        parts = [f"method {meta['method']}" if meta.get("method") else None,
                 f"requested sparsity {meta['sparsity']:.0%}" if meta.get("sparsity") is not None else None,
                 f"{meta['removed']} of the decoder-layer linear parameters removed" if meta.get("removed") else None,
                 f"compensation {meta['compensation']}" if meta.get("compensation") else None,
                 f"kept {meta['kept']}" if meta.get("kept") else None]
        made = f"pgprune {meta['version']}" if meta.get("version") else "pgprune"
        w.add_description(f"Structured pruning with {made}: " + "; ".join(x for x in parts if x) +
                          f". Written as llama.cpp's deci architecture by pgprune {pgprune.__version__}.")
        w.add_tags(["pruned", "structured-pruning", "pgprune"])
    if meta.get("method"):
        w.add_string("pgprune.method", str(meta["method"]))
    if meta.get("sparsity") is not None:
        w.add_float32("pgprune.sparsity", float(meta["sparsity"]))
    if meta.get("version"):  # the version that pruned it (the description names the writer's)
        w.add_string("pgprune.version", str(meta["version"]))
    return meta


def _tokenizer(writer, tokenizer_dir: Path, n_vocab: int, pre: str | None) -> None:
    import gguf

    from pgprune.io import read_json

    tj = read_json(tokenizer_dir / "tokenizer.json")
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise PgpruneError(f"{tokenizer_dir / 'tokenizer.json'}: a {model.get('type')!r} tokenizer; the GGUF export "
                           "writes byte-level BPE tokenizers (allowed: BPE)")
    vocab = dict(model["vocab"])
    special = {t["id"]: t["content"] for t in tj.get("added_tokens", [])}
    specials = {t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
    for i, text in special.items():
        vocab.setdefault(text, i)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):  # the embedding's rows; ids the tokenizer lacks are padding
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in specials else
                         gguf.TokenType.USER_DEFINED if i in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    if pre:  # llama.cpp's pre-tokenizer name (e.g. "smollm"); unset: its default regex, with a warning on load
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer)


@torch.no_grad()
def save_gguf(model, out_path: str | Path, tokenizer_dir: str | Path, *, dtype: str = "float32",
              tokenizer_pre: str | None = None) -> dict:
    """Write ``model`` (a pruned model of either layout, or any Llama/Mistral/Qwen2 model) as a llama.cpp GGUF
    file of architecture ``deci``; ``tokenizer_dir`` holds its ``tokenizer.json`` (and ``tokenizer_config.json``;
    a pgprune folder's ``README.md`` / ``masks.json`` give the metadata). ``dtype``: float32, float16, bfloat16
    or q8_0 for the matrices (norms, biases and rope_freqs stay float32; see the module docstring).
    ``tokenizer_pre``: llama.cpp's pre-tokenizer name for the text it tokenizes itself (``smollm`` for
    SmolLM/SmolLM2, ``llama-bpe`` for Llama 3; None: llama.cpp's default regex). Returns what was written: path,
    architecture, dtype, per written layer ``{"layer": index in the model, "heads", "kv_heads", "ff"}``, the tensor
    count, ``notes`` (the rewritten layers) and ``metadata``. The file is written atomically."""
    import gguf

    if dtype not in DTYPES:
        raise PgpruneError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    tok_dir = Path(tokenizer_dir)
    if not (tok_dir / "tokenizer.json").is_file():
        raise PgpruneError(f"no tokenizer.json in {tok_dir}; the GGUF export needs the model's tokenizer files")
    adapter = family_adapter(model)
    cfg = model.config
    _check(model)
    blocks, shift, notes = plan_blocks(model)
    hd = adapter.head_dim()
    rope_kind, rope_params = _rope(cfg)
    qtype = gguf.GGMLQuantizationType[DTYPES[dtype][0]]
    Q = gguf.GGMLQuantizationType

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), ARCH, use_temp_file=True)  # tensors spool to disk, not all in memory
    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR

    def put(name: str, t: torch.Tensor) -> None:
        """A 1-D tensor (or a norm) as float32, a matrix [out, in] as ``dtype`` (q8_0 needs in % 32 == 0)."""
        a = t.detach().to("cpu", torch.float32).contiguous().numpy()
        kind = Q.F32 if a.ndim < 2 or name.endswith("_norm.weight") else qtype
        if kind == Q.Q8_0 and a.shape[-1] % Q8_BLOCK:
            kind = Q.F16  # convert_hf_to_gguf.py's fallback for a row that is not whole q8_0 blocks
        w.add_tensor(name, a if kind == Q.F32 else gguf.quants.quantize(a, kind), raw_dtype=kind)

    def nonzero(b: torch.Tensor | None) -> bool:
        return b is not None and bool(b.detach().ne(0).any())

    meta = _metadata(w, cfg, tok_dir)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(len(blocks))
    w.add_head_count([int(b.heads) for b in blocks])  # plain int lists: written as INT32 arrays
    w.add_head_count_kv([int(b.kv_heads) for b in blocks])
    w.add_feed_forward_length([int(b.ff) for b in blocks])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(float(rope_params["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    embed = model.get_input_embeddings().weight  # [vocab, hidden]
    n_vocab = int(embed.shape[0])
    w.add_vocab_size(n_vocab)
    w.add_file_type(FILE_TYPES[dtype])
    _tokenizer(w, tok_dir, n_vocab, tokenizer_pre)

    put(names[T.TOKEN_EMBD] + ".weight", embed if shift is None else embed.float() + shift[None, :])
    put(names[T.OUTPUT_NORM] + ".weight", adapter.decoder().norm.weight)
    head = adapter.lm_head().weight  # [vocab, hidden]
    tied = head.data_ptr() == embed.data_ptr() or bool(getattr(cfg, "tie_word_embeddings", False))
    if not tied or shift is not None:  # llama.cpp reuses token_embd as the output only when no tensor is given
        put(names[T.OUTPUT] + ".weight", head)
    if rope_kind == "llama3":
        put(names[T.ROPE_FREQS] + ".weight", rope_freq_factors(rope_params, hd))
    d = int(cfg.hidden_size)
    for j, b in enumerate(blocks):
        p = adapter.parts(b.src)

        def name(kind, suffix, _j=j):
            return names[kind].format(bid=_j) + suffix

        if b.heads:
            put(name(T.ATTN_NORM, ".weight"), p.input_norm.weight)
            put(name(T.ATTN_Q, ".weight"), _rope_rows(p.q_proj.weight, hd))
            put(name(T.ATTN_K, ".weight"), _rope_rows(p.k_proj.weight, hd))
            put(name(T.ATTN_V, ".weight"), p.v_proj.weight)
            put(name(T.ATTN_OUT, ".weight"), p.o_proj.weight)
            for kind, mod, rope in ((T.ATTN_Q, p.q_proj, True), (T.ATTN_K, p.k_proj, True),
                                    (T.ATTN_V, p.v_proj, False), (T.ATTN_OUT, p.o_proj, False)):
                if nonzero(mod.bias):
                    put(name(kind, ".bias"), _rope_rows(mod.bias, hd) if rope else mod.bias)
        put(name(T.FFN_NORM, ".weight"), p.post_attention_norm.weight)
        if b.zero_mlp:
            put(name(T.FFN_GATE, ".weight"), torch.zeros(1, d))  # [1, hidden]
            put(name(T.FFN_UP, ".weight"), torch.zeros(1, d))
            put(name(T.FFN_DOWN, ".weight"), torch.zeros(d, 1))  # [hidden, 1]
        else:
            put(name(T.FFN_GATE, ".weight"), p.gate_proj.weight)
            put(name(T.FFN_UP, ".weight"), p.up_proj.weight)
            put(name(T.FFN_DOWN, ".weight"), p.down_proj.weight)
            if nonzero(p.gate_proj.bias) or nonzero(p.up_proj.bias):
                put(name(T.FFN_GATE, ".bias"), p.gate_proj.bias if p.gate_proj.bias is not None else torch.zeros(b.ff))
                put(name(T.FFN_UP, ".bias"), p.up_proj.bias if p.up_proj.bias is not None else torch.zeros(b.ff))
        if nonzero(b.down_bias):
            put(name(T.FFN_DOWN, ".bias"), b.down_bias)
    n_tensors = sum(len(t) for t in w.tensors) if isinstance(w.tensors, list) else len(w.tensors)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    layers = [{"layer": b.src, "heads": b.heads, "kv_heads": b.kv_heads, "ff": b.ff} for b in blocks]
    return {"path": str(out), "architecture": ARCH, "dtype": dtype, "layers": layers, "tensors": n_tensors,
            "notes": notes, "metadata": meta}


__all__ = ["ARCH", "DTYPES", "save_gguf", "family_adapter", "layer_shapes", "plan_blocks", "rope_freq_factors"]
