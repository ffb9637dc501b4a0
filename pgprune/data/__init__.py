"""Text corpora (hub or local files) and token blocks for calibration and evaluation."""
from pgprune.data.blocks import calibration_blocks, tokenize_blocks, tokenize_stream
from pgprune.data.hub import HUB_CORPORA, hf_offline, hub_names, load_hub_documents, load_hub_text

__all__ = ["HUB_CORPORA", "calibration_blocks", "hf_offline", "hub_names", "load_hub_documents", "load_hub_text",
           "tokenize_blocks", "tokenize_stream"]
