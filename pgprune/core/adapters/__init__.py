"""Model-family adapters. ``get_adapter(model)`` picks one by ``config.model_type``."""
from __future__ import annotations

from pgprune.core.adapters.base import Adapter, LayerParts, Layout
from pgprune.core.adapters.llama import LlamaAdapter
from pgprune.core.adapters.mistral import MistralAdapter
from pgprune.core.adapters.qwen2 import Qwen2Adapter
from pgprune.errors import UnsupportedArchitectureError

ADAPTERS: dict[str, type[Adapter]] = {}
for _cls in (LlamaAdapter, MistralAdapter, Qwen2Adapter):
    for _t in _cls.model_types:
        ADAPTERS[_t] = _cls


def base_model_type(config) -> str:
    """model_type of the family, also for pgprune's own pruned configs ('pgprune_llama' -> 'llama')."""
    t = getattr(config, "model_type", None)
    return getattr(config, "base_model_type", None) or t


def adapter_class(config) -> type[Adapter]:
    t = base_model_type(config)
    if t not in ADAPTERS:
        archs = getattr(config, "architectures", None)
        raise UnsupportedArchitectureError(
            f"model_type={t!r} (architectures={archs}) is not supported; supported model types: "
            f"{sorted(ADAPTERS)} (LLaMA-1/2/3, Vicuna, Mistral, Qwen2)")
    return ADAPTERS[t]


def get_adapter(model) -> Adapter:
    return adapter_class(model.config)(model)


__all__ = ["Adapter", "LayerParts", "Layout", "ADAPTERS", "get_adapter", "adapter_class", "base_model_type"]
