"""GGUF export of a pruned model for llama.cpp, as its ``deci`` architecture (per-layer head counts and FFN widths).

llama.cpp's ``deci`` graph (src/models/deci.cpp, the DeciLM / Llama-3_1-Nemotron-NAS models) is the Llama layer
with three per-layer hyper-parameters read as arrays: ``deci.attention.head_count``,
``deci.attention.head_count_kv`` and ``deci.feed_forward_length`` (one entry per decoder layer), and optional
``attn_output.bias`` / ``ffn_down.bias`` tensors, which is what pgprune's heterogeneous (and uniform) models are:
every kept layer keeps its own number of KV groups (x G query heads) and MLP channels, and mean compensation or the
refit adds o_proj/down_proj biases. So one file format serves both layouts, without a converter of llama.cpp's own
(its ``DeciModel`` reads NVIDIA's ``block_configs`` only).

What is written (gguf-py's :class:`gguf.GGUFWriter`, float32 or float16 matrices):

* hyper-parameters: context length, embedding length, block count, the three per-layer arrays, key/value length
  and rope dimension = head_dim (llama.cpp otherwise derives head_dim from layer 0's head count, which pruning
  changes), rope base, RMS-norm epsilon;
* tensors: ``token_embd``, ``output_norm``, ``output`` (unless tied), per layer ``attn_norm``, ``attn_q/k/v/output``
  (+ ``attn_output.bias``, ``attn_k/v.bias`` when present), ``ffn_norm``, ``ffn_gate/up/down`` (+ ``ffn_down.bias``).
  q_proj/k_proj rows (and biases) are permuted head by head from transformers' rotate-half RoPE layout to
  llama.cpp's adjacent-pair layout (``w.reshape(n, 2, hd/2, ...).swapaxes(1, 2)``), like convert_hf_to_gguf.py;
* the tokenizer from ``tokenizer.json`` (byte-level BPE as ``gpt2``, its special tokens as CONTROL) with merges,
  special ids and the chat template (:class:`gguf.SpecialVocab`).

Refused, with the layer named: a layer that keeps no attention head or no MLP channel (llama.cpp's ``deci`` drops
the o_proj bias of an attention-free layer and the attention output of an FFN-free one), q_proj biases of a pruned
layer (llama.cpp declares ``attn_q.bias`` with the full width: Qwen2 with pruned heads), sliding-window attention and
RoPE scaling (``deci`` has neither).
"""
from __future__ import annotations

from pathlib import Path

import torch

from pgprune.core.adapters import get_adapter
from pgprune.errors import PgpruneError

ARCH = "deci"
FILE_TYPES = {"float32": 0, "float16": 1}  # gguf.LlamaFileType ALL_F32 / MOSTLY_F16


def _rope_rows(w: torch.Tensor, hd: int) -> torch.Tensor:
    """Rows of a q/k weight [n*hd, in] or bias [n*hd] from rotate-half to adjacent-pair RoPE order."""
    n = w.shape[0] // hd
    return w.reshape(n, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    rp = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = (rp.get("rope_type") if isinstance(rp, dict) else None) or (
        scaling.get("rope_type") or scaling.get("type") if isinstance(scaling, dict) else None) or "default"
    if kind != "default":
        raise PgpruneError(f"RoPE scaling {kind!r} is not supported by the GGUF (deci) export; allowed: default")
    theta = (rp.get("rope_theta") if isinstance(rp, dict) else None) or getattr(config, "rope_theta", None)
    return float(theta or 10000.0)


def layer_shapes(model) -> list[dict]:
    """Per decoder layer: heads, kv_heads, ff (channels) and which output biases it has."""
    adapter = get_adapter(model)
    hd = adapter.head_dim()
    out = []
    for i in range(len(adapter.layers())):
        p = adapter.parts(i)
        out.append({"heads": p.q_proj.out_features // hd, "kv_heads": p.k_proj.out_features // hd,
                    "ff": p.gate_proj.out_features, "o_bias": p.o_proj.bias is not None,
                    "down_bias": p.down_proj.bias is not None, "q_bias": p.q_proj.bias is not None})
    return out


def _check(model, shapes: list[dict]) -> None:
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < getattr(cfg, "max_position_embeddings", 0):
        raise PgpruneError(f"sliding-window attention (window {window}) is not supported by llama.cpp's deci "
                           "architecture; the GGUF export needs full attention")
    n_embd = cfg.hidden_size
    hd = get_adapter(model).head_dim()
    for i, s in enumerate(shapes):
        if s["heads"] == 0 or s["ff"] == 0:
            raise PgpruneError(f"layer {i} keeps {s['heads']} attention heads and {s['ff']} MLP channels; llama.cpp's "
                               "deci architecture needs both > 0 in every layer (it drops the o_proj bias of an "
                               "attention-free layer and the attention output of an FFN-free one); prune with "
                               "search.min_heads_per_layer >= 1 and keep MLP channels in every layer")
        if s["q_bias"] and s["heads"] * hd != n_embd:
            raise PgpruneError(f"layer {i} has a q_proj bias of {s['heads'] * hd} entries; llama.cpp's deci declares "
                               f"attn_q.bias with {n_embd} (unpruned) entries, so pruned heads with q biases (Qwen2) "
                               "cannot be exported to GGUF")


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
    """Write ``model`` (a pruned model of either layout, or any Llama/Mistral model) as a llama.cpp GGUF file of
    architecture ``deci``; ``tokenizer_dir`` holds its ``tokenizer.json`` (and ``tokenizer_config.json``).
    ``dtype``: float32 or float16 for the 2-D weights (norms and biases stay float32). ``tokenizer_pre``:
    llama.cpp's pre-tokenizer name for the text it tokenizes itself (``smollm`` for SmolLM/SmolLM2, ``llama-bpe``
    for Llama 3; None: llama.cpp's default regex). Returns what was written
    (architecture, per-layer heads/kv_heads/ff, tensor count, path). The file is written atomically."""
    import gguf

    if dtype not in FILE_TYPES:
        raise PgpruneError(f"dtype={dtype!r}; allowed: {', '.join(FILE_TYPES)}")
    tok_dir = Path(tokenizer_dir)
    if not (tok_dir / "tokenizer.json").is_file():
        raise PgpruneError(f"no tokenizer.json in {tok_dir}; the GGUF export needs the model's tokenizer files")
    adapter = get_adapter(model)
    cfg = model.config
    shapes = layer_shapes(model)
    _check(model, shapes)
    hd = adapter.head_dim()
    mat = torch.float16 if dtype == "float16" else torch.float32

    def arr(t: torch.Tensor, matrix: bool = True):
        return t.detach().to("cpu", mat if matrix and t.dim() == 2 else torch.float32).contiguous().numpy()

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), ARCH)
    w.add_name(str(getattr(cfg, "_name_or_path", "") or "pgprune-pruned"))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(len(shapes))
    w.add_head_count([int(s["heads"]) for s in shapes])  # plain int lists: written as INT32 arrays
    w.add_head_count_kv([int(s["kv_heads"]) for s in shapes])
    w.add_feed_forward_length([int(s["ff"]) for s in shapes])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    embed = model.get_input_embeddings().weight
    n_vocab = int(embed.shape[0])
    w.add_vocab_size(n_vocab)
    w.add_file_type(FILE_TYPES[dtype])
    _tokenizer(w, tok_dir, n_vocab, tokenizer_pre)

    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    w.add_tensor(names[T.TOKEN_EMBD] + ".weight", arr(embed))
    w.add_tensor(names[T.OUTPUT_NORM] + ".weight", arr(adapter.decoder().norm.weight, False))
    head = adapter.lm_head().weight
    tied = head.data_ptr() == embed.data_ptr() or bool(getattr(cfg, "tie_word_embeddings", False))
    if not tied:
        w.add_tensor(names[T.OUTPUT] + ".weight", arr(head))
    for i in range(len(shapes)):
        p = adapter.parts(i)

        def put(kind, suffix, t, matrix=True, _i=i):
            w.add_tensor(names[kind].format(bid=_i) + suffix, arr(t, matrix))

        put(T.ATTN_NORM, ".weight", p.input_norm.weight, False)
        put(T.ATTN_Q, ".weight", _rope_rows(p.q_proj.weight, hd))
        put(T.ATTN_K, ".weight", _rope_rows(p.k_proj.weight, hd))
        put(T.ATTN_V, ".weight", p.v_proj.weight)
        put(T.ATTN_OUT, ".weight", p.o_proj.weight)
        if p.q_proj.bias is not None:
            put(T.ATTN_Q, ".bias", _rope_rows(p.q_proj.bias, hd), False)
        if p.k_proj.bias is not None:
            put(T.ATTN_K, ".bias", _rope_rows(p.k_proj.bias, hd), False)
        if p.v_proj.bias is not None:
            put(T.ATTN_V, ".bias", p.v_proj.bias, False)
        if p.o_proj.bias is not None:
            put(T.ATTN_OUT, ".bias", p.o_proj.bias, False)
        put(T.FFN_NORM, ".weight", p.post_attention_norm.weight, False)
        put(T.FFN_GATE, ".weight", p.gate_proj.weight)
        put(T.FFN_UP, ".weight", p.up_proj.weight)
        put(T.FFN_DOWN, ".weight", p.down_proj.weight)
        if p.down_proj.bias is not None:
            put(T.FFN_DOWN, ".bias", p.down_proj.bias, False)
    n_tensors = len(w.tensors[0]) if isinstance(w.tensors, list) else len(w.tensors)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": str(out), "architecture": ARCH, "layers": shapes, "tensors": n_tensors, "dtype": dtype}


__all__ = ["ARCH", "save_gguf", "layer_shapes"]
