"""HF classes for pruned models with per-layer widths (shipped next to saved weights for trust_remote_code)."""
