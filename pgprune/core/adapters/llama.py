"""LLaMA-1/2/3 and Vicuna (model_type 'llama'): no biases, RoPE, MHA or GQA."""
from pgprune.core.adapters.base import Adapter


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama",)
