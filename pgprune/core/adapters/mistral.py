"""Mistral (model_type 'mistral'): LLaMA layout with GQA and an optional sliding attention window."""
from pgprune.core.adapters.base import Adapter


class MistralAdapter(Adapter):
    family = "mistral"
    model_types = ("mistral",)

    def sliding_window(self, i: int) -> int | None:
        window = getattr(self.config, "sliding_window", None)
        return int(window) if window else None
