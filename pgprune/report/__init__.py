"""Report: markdown tables and matplotlib figures from the pipeline's JSON/CSV artifacts (no torch needed)."""
from __future__ import annotations

from pgprune.report.tables import (comparison_rows, csv_text, kept_per_layer_rows, markdown_report, markdown_table,
                                   ppl_vs_sparsity_rows, read_history_csv, search_loss_rows)


def compare_folder_name(sparsity: float) -> str:
    """Folder of one compare@S stage under artifacts/compare: ``s`` + S as DVC renders ``${item}`` in dvc.yaml
    (``artifacts/compare/s${item}``), i.e. Python's ``str`` of the float read from params.yaml: ``s0.3``.

    stages/compare.py must write the same folder (its ``f"s{s:g}"`` agrees up to 6 significant digits);
    tests/test_report.py checks all three.
    """
    return f"s{float(sparsity)}"


__all__ = ["compare_folder_name", "comparison_rows", "csv_text", "kept_per_layer_rows", "markdown_report",
           "markdown_table", "ppl_vs_sparsity_rows", "read_history_csv", "search_loss_rows"]
