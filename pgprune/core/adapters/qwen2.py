"""Qwen2 / Qwen2.5 (model_type 'qwen2'): LLaMA layout with q/k/v biases and per-layer sliding windows."""
from pgprune.core.adapters.base import Adapter


class Qwen2Adapter(Adapter):
    family = "qwen2"
    model_types = ("qwen2",)

    def sliding_window(self, i: int) -> int | None:
        cfg = self.config
        if not getattr(cfg, "use_sliding_window", False):
            return None
        return super().sliding_window(i)
