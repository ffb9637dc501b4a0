#!/usr/bin/env bash
# Set up (idempotent), then run the whole pipeline (dvc repro) on params.yaml: by default the embedded
# SmolLM2-135M and the local Debian corpus. Extra arguments go to `dvc repro` (e.g. a stage name).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
export PATH="$PWD/${PGPRUNE_VENV:-.venv}/bin:$PATH"
dvc repro "$@"
echo "report: report/report.md"
