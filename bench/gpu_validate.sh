#!/usr/bin/env bash
# Turn a GPU machine into committed evidence: build sparsekern in place, run the cuda tests, compute-sanitizer on a
# small subset, the GEMM / overhead / pruning benchmarks, and write bench/results/<date>-<gpu>/ (summary.md, JSON,
# CSV, PNG, logs, versions, git commit). Commit that folder afterwards.
#
# Needs on the machine: python with torch (CUDA build), nvcc, ninja, pybind11, the cuSPARSELt wheel. No package
# registry is used. pytest, jsonschema and matplotlib are used when present (without matplotlib: no PNG, noted).
#
# Every step runs under `timeout` (at most 570 s, so each stays under 10 minutes; the whole run is about 25), logs
# to logs/<step>.log, and the run goes on past a failing step; steps.tsv and summary.md record each step's status.
#
# Usage: bench/gpu_validate.sh [--dry-run] [--out DIR] [--skip-build] [--quick] [--python PY]
#   --dry-run     list the steps (name, time limit, command) and exit; runs nothing, writes nothing
#   --out DIR     results folder (default bench/results/<UTC date>-<gpu name>)
#   --skip-build  use the extension already built in place
#   --quick       small benchmark sweeps (M <= 256, llama3-8b only): a smoke run in a few minutes
#   --python PY   interpreter (default: $PYTHON, else python3)
# Environment: TORCH_CUDA_ARCH_LIST (default: this GPU's arch, e.g. 9.0a on an H100), MAX_JOBS (default nproc).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
DRY=0
OUT=""
SKIP_BUILD=0
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=${2:?--out needs a directory}; shift ;;
    --skip-build) SKIP_BUILD=1 ;;
    --quick) QUICK=1 ;;
    --python) PY=${2:?--python needs an interpreter}; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_validate.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# ------------------------------------------------------------------------------------------ facts of this machine
gpu_name() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1
  else
    "$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null
  fi
}
GPU=$(gpu_name)
GPU=${GPU:-unknown-gpu}
SLUG=$(printf '%s' "$GPU" | tr '[:upper:]' '[:lower:]' | sed -e 's/nvidia//g' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
DATE=$(date -u +%Y-%m-%d)
R=${OUT:-bench/results/${DATE}-${SLUG:-gpu}}

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  # This GPU's arch only (a fast build); "a" (arch-specific features: wgmma, sparse wgmma) from sm90 on.
  TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; M,m=torch.cuda.get_device_capability(0); print(f"{M}.{m}" + ("a" if M >= 9 else ""))' 2>/dev/null || echo "8.0;9.0a")
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
SANITIZER=$(command -v compute-sanitizer || true)
for c in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
  [ -z "$SANITIZER" ] && [ -x "$c" ] && SANITIZER=$c
done
SANITIZER=${SANITIZER:-compute-sanitizer}  # not found: the sanitizer steps fail with a message saying so
HAVE_SAN="command -v \"$SANITIZER\" >/dev/null || { echo 'compute-sanitizer not found (CUDA toolkit without it?)'; exit 3; }"

if [ "$QUICK" = 1 ]; then
  SWEEP="--m 1,16,256"; PRESETS_BIG="llama3-8b"
else
  SWEEP=""; PRESETS_BIG="llama3-8b,llama3-70b"
fi
GEMM="\"$PY\" -m sparsekern bench gemm --device cuda --iters 50 --max-seconds 0.2 $SWEEP"

# ------------------------------------------------------------------------------------------------------ the steps
# name | time limit (s) | command (run with bash -c in the repository root; $R is the results folder)
STEPS=(
  "versions|120|\"$PY\" bench/versions.py --out \"$R/versions.json\""
  "build|570|[ $SKIP_BUILD = 1 ] && echo 'skipped by --skip-build' || SPARSEKERN_CUDA=1 \"$PY\" setup.py build_ext --inplace -t build/gpu-temp"
  "import|120|\"$PY\" -c 'import sparsekern, json; from sparsekern import _ext; info = _ext.build_info(); print(json.dumps(info, default=str)); print(_ext.load_error()); assert info.get(\"with_cuda\"), \"extension is not the CUDA build\"'"
  "pytest_cuda|570|\"$PY\" -m pytest -q -m cuda -p no:cacheprovider --junitxml=\"$R/pytest-cuda.xml\" tests"
  "memcheck|570|$HAVE_SAN; PYTORCH_NO_CUDA_MEMORY_CACHING=1 \"$SANITIZER\" --tool memcheck --error-exitcode 9 --leak-check no \"$PY\" bench/cuda_smoke.py --ops all"
  "racecheck|570|$HAVE_SAN; \"$SANITIZER\" --tool racecheck --error-exitcode 9 \"$PY\" bench/cuda_smoke.py --ops own"
  "gemm_bf16|570|$GEMM --preset $PRESETS_BIG --dtype bf16 --out \"$R/gemm-bf16\" --policy \"$R/policy.json\""
  "gemm_int8|570|$GEMM --preset $PRESETS_BIG --dtype int8 --out \"$R/gemm-int8\" --policy \"$R/policy.json\""
  "gemm_fp16_fp8|570|$GEMM --preset llama3-8b --dtype fp16,fp8 --out \"$R/gemm-fp16-fp8\" --policy \"$R/policy.json\""
  "gemm_llama2|570|$GEMM --preset llama2-7b --dtype bf16 --out \"$R/gemm-llama2-7b\" --policy \"$R/policy.json\""
  "overhead|570|\"$PY\" -m sparsekern bench overhead --device cuda --dtype bf16,fp16 --out \"$R/overhead\""
  "prune|570|mkdir -p \"$R/prune\" && \"$PY\" -m sparsekern bench prune --devices cuda --budget 20 --json \"$R/prune/prune.json\""
  "summary|120|\"$PY\" -m sparsekern.bench.report summarize \"$R\" --steps \"$R/steps.tsv\" > \"$R/summary.md\" && \"$PY\" bench/render_readme.py --results \"$R\" > \"$R/readme-section.md\""
)

if [ "$DRY" = 1 ]; then
  echo "gpu_validate.sh --dry-run: results would go to $R (GPU: $GPU, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  i=0
  for s in "${STEPS[@]}"; do
    i=$((i + 1))
    IFS='|' read -r name limit cmd <<<"$s"
    printf '%2d. %-14s (limit %ss)  %s\n' "$i" "$name" "$limit" "$cmd"
  done
  exit 0
fi

mkdir -p "$R/logs"
printf 'step\tstatus\tseconds\tlog\n' > "$R/steps.tsv"
git rev-parse HEAD > "$R/git-commit.txt" 2>/dev/null || echo "not a git checkout" > "$R/git-commit.txt"
git status --porcelain > "$R/git-status.txt" 2>/dev/null || true
echo "results: $R (GPU: $GPU, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"

FAILED=0
T0=$(date +%s)
for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$s"
  log="$R/logs/$name.log"
  start=$(date +%s)
  echo "== $name (limit ${limit}s) ..."
  {
    echo "\$ $cmd"
    echo "# started $(date -u +%FT%TZ)"
  } > "$log"
  # -k 30: after SIGTERM a benchmark gets 30 s to write what it measured before SIGKILL.
  timeout -k 30 "$limit" bash -c "$cmd" >> "$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  case $rc in
    0) status=ok ;;
    124|137) status="timeout" ; FAILED=$((FAILED + 1)) ;;
    *) status="failed (rc $rc)" ; FAILED=$((FAILED + 1)) ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "logs/$name.log" >> "$R/steps.tsv"
  echo "   $status in ${secs}s (log: $log)"
done
TOTAL=$(( $(date +%s) - T0 ))
echo "done in ${TOTAL}s; $FAILED step(s) not ok; see $R/summary.md and $R/steps.tsv"
echo "commit the evidence: git add $R && git commit -m \"GPU results: $GPU\" -- $R"
# The summary step ran before this line; re-run it so the summary's step table includes itself.
"$PY" -m sparsekern.bench.report summarize "$R" --steps "$R/steps.tsv" > "$R/summary.md" 2>>"$R/logs/summary.log" || true
[ "$FAILED" = 0 ]
