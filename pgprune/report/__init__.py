"""Report: markdown tables and matplotlib figures from the pipeline's JSON/CSV artifacts (no torch needed)."""
from __future__ import annotations

from pgprune.report.collect import collect_results, search_summary, sparsity_tag
from pgprune.report.tables import (
                                   comparison_rows,
                                   csv_text,
                                   kept_per_layer_rows,
                                   markdown_report,
                                   markdown_table,
                                   ppl_vs_sparsity_rows,
                                   read_history_csv,
                                   search_loss_rows,
)

__all__ = ["collect_results", "comparison_rows", "csv_text", "kept_per_layer_rows", "markdown_report", "markdown_table",
           "ppl_vs_sparsity_rows", "read_history_csv", "search_loss_rows", "search_summary", "sparsity_tag"]
