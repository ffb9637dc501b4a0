#!/usr/bin/env bash
# Render the DVC plots of dvc.yaml (and of experiments/revisions given as arguments, e.g. `HEAD~1` or an
# experiment name) into dvc_plots/index.html, viewable offline: vega, vega-lite and vega-embed are inlined
# from pgprune/assets/dvc_plots_template.html instead of DVC's default CDN <script> tags.
# Usage: bash scripts/plots.sh [dvc plots diff revisions...]   (output folder: dvc_plots/, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1
DVC="${PGPRUNE_VENV:-.venv}/bin/dvc"; [ -x "$DVC" ] || DVC=dvc
TEMPLATE=pgprune/assets/dvc_plots_template.html
if [ "$#" -gt 0 ]; then
  "$DVC" plots diff "$@" --html-template "$TEMPLATE" -o dvc_plots
else
  "$DVC" plots show --html-template "$TEMPLATE" -o dvc_plots
fi
if grep -q '<script[^>]*src="https://cdn' dvc_plots/index.html; then
  echo "error: dvc_plots/index.html loads scripts from a CDN (template not applied?)" >&2; exit 1
fi
echo "plots: dvc_plots/index.html (offline)"
