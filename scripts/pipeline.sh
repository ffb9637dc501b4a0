#!/usr/bin/env bash
# Set up (idempotent), then run the whole pipeline (dvc repro) on params.yaml: by default the embedded
# SmolLM2-135M and the local Debian corpus. Extra arguments go to `dvc repro` (e.g. a stage name).
# When the default DVC remote is a local folder that exists (a clone next to ../pgprune-dvc-remote), stages whose
# dvc.lock entry matches are restored from it (`dvc repro --pull`) instead of being recomputed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
export PATH="$PWD/${PGPRUNE_VENV:-.venv}/bin:$PATH"
pull=()
if remote=$(dvc remote default 2>/dev/null) && [ -n "$remote" ] && url=$(dvc config "remote.$remote.url" 2>/dev/null); then
    case "$url" in
        *://*) ;;                                          # a cloud/SSH remote: `dvc pull` it yourself
        /*) [ -d "$url" ] && pull=(--pull) ;;
        *) [ -d ".dvc/$url" ] && pull=(--pull) ;;          # relative to .dvc/, as DVC resolves it
    esac
fi
[ ${#pull[@]} -gt 0 ] && echo "DVC remote '$remote' found: restoring cached stages from it (dvc repro --pull)"
dvc repro "${pull[@]}" "$@"
echo "report: report/report.md"
