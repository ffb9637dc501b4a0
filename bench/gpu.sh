#!/usr/bin/env bash
# One prepared GPU check: every GPU test and the GPU benchmarks, in at most 8 minutes on one H200 (set-up included),
# writing every RESULT line to one file headed by the GPU name, the commit and the torch/CUDA versions.
#
#   bash bench/gpu.sh [RESULTS_FILE]
#
# RESULTS_FILE: default $OUT/gpu-results.txt when $OUT is set (the device machine), else
# bench/results/gpu-<date>.txt. The full output of every step goes to RESULTS_FILE with .log appended.
# Environment: PGPRUNE_VENV (the venv that scripts/setup.sh makes, default .venv); GPU_PYTHON=/path/to/python uses
# that interpreter instead and skips the set-up (a machine without network or apt whose Python already has a CUDA
# torch and the project's dependencies; the checkout goes on PYTHONPATH). On the lent H200 image (torch 2.11,
# transformers 5.17, peft, accelerate) only pydantic was missing: its wheels (pydantic, pydantic_core,
# annotated-types, typing-inspection, typing_extensions at constraints.txt's versions) were carried and installed
# with `pip install --no-index --target`, then `GPU_PYTHON=python3 bash bench/gpu.sh` (2026-12-04: 251 s).
#
# Steps and their budgets (each runs under `timeout`, so one hang costs only its own budget; 480 s in all):
#   setup            100 s  bash scripts/setup.sh (idempotent: seconds when the venv is there), then a CUDA check
#   checkpoint        40 s  the synthetic TinyLlama-1.1B checkpoint (bf16, random weights) that the benchmarks share
#   gpu-tests         70 s  pytest tests/test_gpu.py and every other test file with tests marked gpu (-m gpu)
#   search-cost       50 s  bench.search_cost, TinyLlama-1.1B, K=4 x 8 x 128, batched vs separate, in memory
#   search-cost-disk  60 s  bench.search_cost, the same streamed from disk (offload disk) vs in memory
#   masked-forward    30 s  bench.masked_forward, TinyLlama-1.1B, 8 x 512
#   generation        40 s  bench.generation, TinyLlama-1.1B, batches 1 and 16, 32 new tokens
#   scaling           50 s  bench.scaling, TinyLlama-1.1B in memory and offload disk, K=4 x 8 x 128, 3 steps
#   search-quality    40 s  bench.search_quality --smoke on cuda (its real run needs the pipeline's prepared inputs)
# A failed or timed-out step is recorded (FAILED <step> rc=...) and the others still run; the exit status is
# non-zero when any step failed. Without an NVIDIA GPU (or with a torch that sees none) it stops at once.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${PGPRUNE_VENV:-.venv}"
PY="${GPU_PYTHON:-$VENV/bin/python}"
[ -z "${GPU_PYTHON:-}" ] || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 \
  PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1 TQDM_DISABLE=1

if [ $# -ge 1 ]; then RESULTS="$1"
elif [ -n "${OUT:-}" ]; then RESULTS="$OUT/gpu-results.txt"
else RESULTS="bench/results/gpu-$(date +%Y%m%d-%H%M%S).txt"; fi
mkdir -p "$(dirname "$RESULTS")"
LOG="$RESULTS.log"
: > "$RESULTS"
: > "$LOG"

die() { echo "gpu.sh: $*" | tee -a "$RESULTS" >&2; exit 2; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  die "no CUDA: nvidia-smi is missing or finds no GPU; run this on a machine with an NVIDIA GPU"
fi

FAILED=()
# step NAME BUDGET_S COMMAND...: run COMMAND under `timeout`, its output to the log, its RESULT lines to RESULTS
step() {
  local name="$1" budget="$2"; shift 2
  local t0=$SECONDS rc
  echo "== $name (budget ${budget}s): $*" | tee -a "$LOG"
  timeout -k 10 "$budget" "$@" 2>> "$LOG" | tee -a "$LOG" | { grep '^RESULT ' >> "$RESULTS" || true; }
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then
    echo "   $name: ok in $((SECONDS - t0))s" | tee -a "$LOG"
  else
    local why="rc=$rc"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then why="timed out after ${budget}s"; fi
    echo "FAILED $name ($why, $((SECONDS - t0))s; see $LOG)" | tee -a "$RESULTS" "$LOG"
    FAILED+=("$name")
  fi
  return 0
}
section() { echo "## $*" >> "$RESULTS"; }

# --- set-up ---------------------------------------------------------------------------------------------------
if [ -z "${GPU_PYTHON:-}" ]; then
  echo "== setup (budget 100s): bash scripts/setup.sh" | tee -a "$LOG"
  if ! timeout -k 10 100 bash scripts/setup.sh >> "$LOG" 2>&1; then
    die "set-up failed or took over 100 s (see $LOG); run 'bash scripts/setup.sh' once, then rerun (or GPU_PYTHON=<a ready interpreter>)"
  fi
fi
[ -x "$PY" ] || command -v "$PY" >/dev/null || die "no Python at $PY (scripts/setup.sh creates $VENV)"
if ! CUDA_INFO="$("$PY" -c 'import torch, sys
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no GPU")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")' 2>&1)"; then
  die "no CUDA: $CUDA_INFO; install a CUDA build of torch for $PY"
fi

COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
[ "$COMMIT" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && COMMIT="$COMMIT (with local changes)"
{
  echo "# pgprune GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
  echo "# commit: $COMMIT"
  echo "# $CUDA_INFO"
} | cat - "$RESULTS" > "$RESULTS.tmp" && mv "$RESULTS.tmp" "$RESULTS"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pgprune-gpu-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
CKPT="$WORK/tinyllama-1.1b-bfloat16"  # bench.scaling --workdir reuses this name
SHAPE=(--synthetic tinyllama-1.1b --dtype bfloat16 --device cuda)
SEARCH=(--batch 8 --seq-len 128 --samples 4)

# --- checks ---------------------------------------------------------------------------------------------------
section "checkpoint"
step checkpoint 40 "$PY" -c "import sys; from bench._common import write_synthetic_checkpoint as w; w('tinyllama-1.1b', 'bfloat16', sys.argv[1])" "$CKPT"

section "gpu-tests: pytest tests/test_gpu.py and -m gpu"
mapfile -t GPU_TESTS < <(grep -lE 'mark\.gpu|pytestmark *= *pytest\.mark\.gpu' tests/test_*.py)
step gpu-tests 70 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py "${GPU_TESTS[@]}"
grep -E '^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped|error)' "$LOG" | tail -n 20 | sed 's/^/# pytest: /' >> "$RESULTS"

section "search-cost: python -m bench.search_cost ${SHAPE[*]} ${SEARCH[*]} --sample-mode batched"
step search-cost 50 "$PY" -m bench.search_cost "${SHAPE[@]}" --checkpoint "$CKPT" "${SEARCH[@]}" --sample-mode batched --repeats 3

section "search-cost-disk: python -m bench.search_cost ${SHAPE[*]} ${SEARCH[*]} --offload disk"
step search-cost-disk 60 "$PY" -m bench.search_cost "${SHAPE[@]}" --checkpoint "$CKPT" "${SEARCH[@]}" --offload disk --repeats 3

section "masked-forward: python -m bench.masked_forward ${SHAPE[*]} --batch 8 --seq-len 512"
step masked-forward 30 "$PY" -m bench.masked_forward "${SHAPE[@]}" --batch 8 --seq-len 512

section "generation: python -m bench.generation ${SHAPE[*]} --batches 1 16 --new-tokens 32 --repeats 2"
step generation 40 "$PY" -m bench.generation "${SHAPE[@]}" --batches 1 16 --new-tokens 32 --repeats 2

section "scaling: python -m bench.scaling --rows tinyllama-1.1b:none tinyllama-1.1b:disk --device cuda ${SEARCH[*]} --steps 3"
step scaling 50 "$PY" -m bench.scaling --rows tinyllama-1.1b:none tinyllama-1.1b:disk --device cuda --dtype bfloat16 \
  "${SEARCH[@]}" --steps 3 --workdir "$WORK"

section "search-quality: python -m bench.search_quality --smoke --device cuda"
step search-quality 40 "$PY" -m bench.search_quality --smoke --device cuda

echo "# total ${SECONDS}s; failed: ${FAILED[*]:-none}" >> "$RESULTS"
echo "results: $RESULTS (full output: $LOG)"
cat "$RESULTS"
[ ${#FAILED[@]} -eq 0 ]
