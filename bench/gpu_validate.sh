#!/usr/bin/env bash
# One short GPU run that turns a lent GPU (an H100 for ~15 minutes, start-up included) into evidence (issue 17):
# build for this GPU only, probe the findings of the pre-flight review, run the cuda tests most likely to break,
# compute-sanitizer, the core benchmark, then the rest of the cuda tests if time is left. Every stage runs under
# `timeout`, and its result (log, a line in DIR/stages.tsv, its JSON) is written as soon as it finishes, so a run
# cut off by the lease still leaves everything done so far. Fold the folder into bench/results/ afterwards with
# `python bench/fold_gpu_results.py DIR` (docs/benchmarks.md).
#
# Usage: bash bench/gpu_validate.sh [--budget S] [--out DIR] [--archive FILE] [--dry-run] [--skip-build]
#                                   [--stages LIST] [--estimate STAGE=S] [--python PY]
#   --budget S        seconds of command time for the whole run (default 570). A stage starts only if its estimate
#                     fits in what is left (else "skipped: budget"); its timeout is min(its limit, what is left).
#   --out DIR         results folder (default build/gpu-validate/<UTC date>-<gpu>)
#   --archive FILE    also keep FILE (.tar.gz of DIR) up to date after every stage: one file to bring back from a
#                     machine that returns only a few files (e.g. --archive "$OUT/gpu-validate.tgz")
#   --dry-run         print the stages in order with their estimates and the total; run nothing, write nothing.
#                     Exit 1 (naming the stages a run would skip) when the total is over --budget.
#   --skip-build      use the extension already built in place (stage a2 is skipped and costs nothing)
#   --stages LIST     run only these stages, e.g. b,c or b-probes,e1 (a letter selects all its stages); the
#                     opt-in stage g (CMake library + ctest, a second ~3-minute build) runs only when named here
#   --estimate ST=S   override a stage's estimate in seconds (repeatable; a slower machine, or the tests)
#   --python PY       interpreter (default: $PYTHON, else python3)
# Exit status: 0 when every stage that ran passed, 1 otherwise, 2 for bad arguments.
# Environment: TORCH_CUDA_ARCH_LIST (default: this GPU's arch, e.g. 9.0a on an H100), MAX_JOBS (default nproc),
# CUDA_HOME, GIT_COMMIT (recorded when the checkout has no .git, as on a copied working tree).
set -uo pipefail

T0=$(date +%s)  # the budget clock: everything from here on counts
CALLER_PWD=$PWD  # relative --out, --archive and --python paths are the caller's
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
BUDGET=570
DRY=0
OUT=""
ARCHIVE=""
SKIP_BUILD=0
ONLY=""
OVERRIDES=()

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
bad() { echo "gpu_validate.sh: $* (see --help)" >&2; exit 2; }
need() { [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || bad "$1 needs a value"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    --budget) need "$@"; BUDGET=$2; shift ;;
    --out) need "$@"; OUT=$2; shift ;;
    --archive) need "$@"; ARCHIVE=$2; shift ;;
    --stages) need "$@"; ONLY=$2; shift ;;
    --estimate) need "$@"; OVERRIDES+=("$2"); shift ;;
    --python) need "$@"; PY=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) bad "unknown argument '$1'" ;;
  esac
  shift
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] && [ "$BUDGET" -gt 0 ] || bad "--budget must be a positive number of seconds, got '$BUDGET'"
abspath() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$CALLER_PWD" "$1" ;; esac; }
[ -z "$OUT" ] || OUT=$(abspath "$OUT")
[ -z "$ARCHIVE" ] || ARCHIVE=$(abspath "$ARCHIVE")
case "$PY" in */*) PY=$(abspath "$PY") ;; esac

# ------------------------------------------------------------------------------------------------------ the stages
# Estimates are for one H100 machine of this workplace (16 cores, torch 2.11+cu130, nvcc 13.0), a cold start: the
# first `import torch` there reads ~2 GB of libraries from disk. They must total <= 570 s (the default budget): a
# `run` call's command may take 600 s (the machine's start and the transfers are not counted in it), and 30 s are
# left for this script's own work and the archive. Limits are the most a stage may take
# when time is left; a stage that overruns its estimate only takes time from the stages after it, which are then
# skipped ("skipped: budget") rather than cut off half-way.
IDS=(a1-versions a2-build b-probes c-tests d-memcheck e1-gemm e2-overhead e3-decode f-tests-rest g-ctest)
OPT_IN=" g-ctest "  # not in the default plan: run only when --stages names it
declare -A EST LIMIT WHAT CMD
# a1: python + import torch (cold: ~5-8 s), nvidia-smi, nvcc --version. Cheap, first, so every run records them.
EST[a1-versions]=15;   LIMIT[a1-versions]=60
WHAT[a1-versions]="bench/versions.py -> versions.json (GPU, driver, torch, CUDA, nvcc, cuSPARSELt, packages)"
# a2: ~17 translation units compiled in parallel (MAX_JOBS = 16 cores): the wall time is the slowest one (a .cu with
# the ATen headers for one arch, ~60-100 s; a .cpp with torch/extension.h ~30-40 s) + setup.py and torch import
# (~10 s) + link (~5 s) + the import check (~5 s). Seen elsewhere as 3-4 minutes; 180 s is the plan, 300 s the cap.
EST[a2-build]=180;     LIMIT[a2-build]=300
WHAT[a2-build]="SPARSEKERN_CUDA=1 setup.py build_ext --inplace for this GPU's arch only (ninja, MAX_JOBS=nproc, ccache if present); the extension must load as the CUDA build"
# b: one process: import (~5 s), CUDA context + cuBLAS/cuSPARSELt handles (~3 s), five probes of 1-3 s each, plus one
# restart (~8 s) if a probe leaves the CUDA context broken.
EST[b-probes]=35;      LIMIT[b-probes]=90
WHAT[b-probes]="bench/gpu_probes.py: findings 1 (compressed size), 2 (graph replay after clear_cache/search), 3 (int8 bias dtype), 4 (epilogue fallback), 6 (pickled cuSPARSELt buffer) -> probes.json"
# c: ~230 small tests (a few ms to ~0.1 s each on the GPU; the first plan per shape ~10-50 ms) + pytest start and
# collection (~10 s). torch.compile and opcheck tests (tens of seconds each) are left to f.
EST[c-tests]=70;       LIMIT[c-tests]=150
WHAT[c-tests]="SPARSEKERN_REQUIRE_CUDA=1 pytest: the cuda tests most likely to break (compress sizes, int8/fp8 epilogues, graphs, search, SparseLinear) -> pytest-c.xml"
# d: torch import and CUDA init under the sanitizer (~20-30 s: each loaded module is instrumented; lazy loading keeps
# that to the kernels used), then 5 smoke cases on tiny inputs at 10-100x slowdown.
EST[d-memcheck]=75;    LIMIT[d-memcheck]=150
WHAT[d-memcheck]="compute-sanitizer --tool memcheck on bench/cuda_smoke.py --ops all (PYTORCH_NO_CUDA_MEMORY_CACHING=1)"
# e1: 4 Llama-3-8B shapes x 4 M x (bf16: 4 contenders, int8: 5) = 144 timings of <= 20 calls (<= 0.05 s of measured
# work each; the largest call, 8192x14336x4096, is ~1.5 ms) + the fp64 check per point (~20 ms at the largest) +
# start (~8 s) + the PNG (~3 s): ~40 s measured, 60 s planned. M <= 16 is e3's. On SIGTERM it writes the points
# measured so far.
EST[e1-gemm]=60;       LIMIT[e1-gemm]=120
WHAT[e1-gemm]="sparsekern bench gemm --device cuda, llama3-8b, M=128,512,2048,8192, bf16+int8: dense cuBLAS, torch._cslt_sparse_mm, sparsekern -> gemm/"
# e2: 4 shapes x 2 dtypes x 4 contenders; the host-only mode holds the GPU with a 50 ms spin per repetition
# (--calls 100 --reps 7: 0.35 s per contender) -> ~12 s + eager and graph ~3 s + start ~8 s.
EST[e2-overhead]=25;   LIMIT[e2-overhead]=60
WHAT[e2-overhead]="sparsekern bench overhead --device cuda, bf16+int8 (per-call host overhead: eager, host-only, graph replay) -> overhead/"
# e3: the decode kernel (issue 22): 8 shapes (Llama-3-8B and 70B) x M = 1, 2, 4, 8, 16 x (bf16, int8) x 4 contenders
# = 320 timings of <= 20 calls of a few to ~60 us (each after an L2 flush) ~ 5 s, weights built per shape (the 70B
# ones: 235M elements, pruned and compressed three ways) ~ 10 s, start ~ 8 s; the goals (copy bandwidth, 1 GiB) ~ 8 s;
# ncu on one M = 1 call (three sections, --clock-control none) ~ 15 s.
EST[e3-decode]=50;     LIMIT[e3-decode]=120
WHAT[e3-decode]="decode kernel: sparsekern bench gemm --device cuda, llama3-8b + llama3-70b, M=1,2,4,8,16, bf16+int8: dense cuBLAS, torch._cslt_sparse_mm, sparsekern cuSPARSELt, sparsekern spmm_24 (the decode kernel) -> decode/; bench/decode_goals.py -> decode/goals.{json,md}; ncu -> decode/ncu.txt"
# f: what is left of the cuda tests (pruning kernels, the spmm_24 fallback, opcheck, torch.compile, bench, pipeline):
# ~150 tests, of which opcheck and torch.compile take most. Runs only with 60 s left, and then gets all of it.
EST[f-tests-rest]=60;  LIMIT[f-tests-rest]=600
WHAT[f-tests-rest]="SPARSEKERN_REQUIRE_CUDA=1 pytest -m cuda tests minus those of c -> pytest-f.xml"
# g (opt-in, --stages g): the C++ library (CMake) with its CUDA kernels for this arch, a second compile of the same
# sources (~3 min on 16 cores, like a2: it does not fit the default 570 s with a2), then ctest, whose
# sparsekern_link_cuda runs its GPU part here. For a second call on a warm machine: --skip-build --stages g.
EST[g-ctest]=200;      LIMIT[g-ctest]=420
WHAT[g-ctest]="opt-in: CMake build of libsparsekern with its CUDA kernels (this arch, SPARSEKERN_CUDA=ON) + ctest (CPU ops, linked program's GPU check)"

for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
  id=${o%%=*}; s=${o#*=}
  [ -n "${EST[$id]+x}" ] || bad "--estimate: unknown stage '$id' (stages: ${IDS[*]})"
  [[ "$s" =~ ^[0-9]+$ ]] || bad "--estimate $o: seconds must be a whole number"
  EST[$id]=$s
done

# --stages: ids or their letter ("a" = a1 + a2, "e" = e1 + e2)
declare -A SELECTED
if [ -n "$ONLY" ]; then
  IFS=',' read -r -a want <<<"$ONLY"
  for w in "${want[@]}"; do
    w=${w// /}; [ -n "$w" ] || continue
    hit=0
    for id in "${IDS[@]}"; do
      if [ "$id" = "$w" ] || [ "${id%%-*}" = "$w" ] || [ "${id:0:1}" = "$w" ]; then SELECTED[$id]=1; hit=1; fi
    done
    [ $hit = 1 ] || bad "--stages: unknown stage '$w' (stages: ${IDS[*]})"
  done
else
  for id in "${IDS[@]}"; do [ "${OPT_IN/ $id /}" = "$OPT_IN" ] && SELECTED[$id]=1; done
fi

# ------------------------------------------------------------------------------------------ facts of this machine
GPU=""; CAP=""
if command -v nvidia-smi >/dev/null 2>&1; then
  line=$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null | head -n1)
  GPU=$(printf '%s' "$line" | cut -d, -f1 | sed 's/^ *//;s/ *$//')
  CAP=$(printf '%s' "$line" | cut -s -d, -f2 | tr -d ' ')
  [ -n "$GPU" ] || GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
fi
if [ "$DRY" = 0 ] && { [ -z "$GPU" ] || [ -z "$CAP" ]; }; then
  # No nvidia-smi (or one without compute_cap): ask torch (a cold import, ~5 s, counted in the budget).
  info=$("$PY" -c 'import torch; M,m=torch.cuda.get_device_capability(0); print(f"{M}.{m}|"+torch.cuda.get_device_name(0))' 2>/dev/null || true)
  if [[ "$info" =~ ^[0-9]+\.[0-9]+\| ]]; then CAP=${CAP:-${info%%|*}}; GPU=${GPU:-${info#*|}}; fi
fi
GPU=${GPU:-unknown-gpu}
SLUG=$(printf '%s' "$GPU" | tr '[:upper:]' '[:lower:]' | sed -e 's/nvidia//g' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
SLUG=${SLUG:-gpu}
DATE=$(date -u +%Y-%m-%d)
R=${OUT:-build/gpu-validate/${DATE}-${SLUG}}
case "$R" in /*) ;; *) R="$ROOT/$R" ;; esac

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ -n "$CAP" ]; then
  # This GPU's arch only (a fast build); "a" (arch-specific features: wgmma, sparse wgmma) from sm90 on.
  major=${CAP%%.*}
  TORCH_CUDA_ARCH_LIST="$CAP$([ "${major:-0}" -ge 9 ] 2>/dev/null && echo a)"
fi
ARCHS=${TORCH_CUDA_ARCH_LIST:-"(unknown: setup.py's default list, a slow build)"}
NVCC=""
for c in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc 2>/dev/null)" /usr/local/cuda/bin/nvcc; do
  [ -n "$c" ] && [ -x "$c" ] && { NVCC=$c; break; }
done
SANITIZER=$(command -v compute-sanitizer 2>/dev/null || true)
for c in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer" \
         "${NVCC:+$(dirname "$NVCC")/compute-sanitizer}"; do
  [ -z "$SANITIZER" ] && [ -n "$c" ] && [ -x "$c" ] && SANITIZER=$c
done

q() {  # shell-quote for the command lines (readable in --dry-run: single quotes only where needed)
  if [[ "$1" =~ ^[A-Za-z0-9_./:=+,@%-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
PYQ=$(q "$PY"); RQ=$(q "$R")

# The c selection: keyword expression over the three files; f runs every other cuda test (the complement, so c + f
# together are exactly `pytest -m cuda tests`: tests/test_gpu_validate.py checks it).
C_FILES="tests/test_cuda_ops.py tests/test_linear.py tests/test_quant.py tests/test_skinny24.py"
C_EXPR="(cslt or compress or graph or search or epilogue or fallback or bias or int8 or fp8 or w8a8 or quant or cuda_move or matches_linear or pickl or torch_load or state_dict or capab or skinny) and not (compile or opcheck)"
F_EXPR="not (($C_EXPR) and (test_cuda_ops.py or test_linear.py or test_quant.py or test_skinny24.py))"
PYTEST="SPARSEKERN_REQUIRE_CUDA=1 $PYQ -m pytest -q -rfE -p no:cacheprovider --durations=15 -m cuda"
# pytest-timeout, where installed: one hung test must not eat the stage
TIMEOUT_OPT='$('"$PYQ"' -c "import pytest_timeout" 2>/dev/null && echo --timeout=120)'

BUILD_ENV="SPARSEKERN_CUDA=1 TORCH_CUDA_ARCH_LIST=$(q "${TORCH_CUDA_ARCH_LIST:-}") MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}"
[ -n "${TORCH_CUDA_ARCH_LIST:-}" ] || BUILD_ENV="SPARSEKERN_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}"
CCACHE=$(command -v ccache 2>/dev/null || true)
if [ -n "$CCACHE" ]; then
  # ccache as the compiler launcher: masquerading links for the host compiler (first on PATH), PYTORCH_NVCC for
  # nvcc; TORCH_NO_COMPILER_WRAPPER stops newer torch from wrapping a second time.
  BUILD_ENV="PATH=$(q "$ROOT/build/ccache-bin"):\$PATH PYTORCH_NVCC=$(q "$CCACHE ${NVCC:-nvcc}") TORCH_NO_COMPILER_WRAPPER=1 $BUILD_ENV"
fi

CMD[a1-versions]="$PYQ bench/versions.py --out $RQ/versions.json"
CMD[a2-build]="$BUILD_ENV $PYQ setup.py build_ext --inplace -t build/gpu-temp && $PYQ bench/gpu_probes.py --check-build"
CMD[b-probes]="$PYQ bench/gpu_probes.py --out $RQ/probes.json"
CMD[c-tests]="$PYTEST $TIMEOUT_OPT -k $(q "$C_EXPR") --junitxml=$RQ/pytest-c.xml $C_FILES"
if [ -n "$SANITIZER" ]; then
  CMD[d-memcheck]="PYTORCH_NO_CUDA_MEMORY_CACHING=1 $(q "$SANITIZER") --tool memcheck --error-exitcode 9 --leak-check no $PYQ bench/cuda_smoke.py --ops all"
else
  CMD[d-memcheck]="echo 'compute-sanitizer not found (on PATH, under \$CUDA_HOME or beside nvcc): no memcheck evidence' >&2; exit 3"
fi
CMD[e1-gemm]="$PYQ -m sparsekern bench gemm --device cuda --preset llama3-8b --m 128,512,2048,8192 --dtype bf16,int8 --contenders dense,dense_int8,torch_cslt,sk_cslt,sk_linear --warmup 3 --iters 20 --min-iters 5 --max-seconds 0.05 --out $RQ/gemm --policy $RQ/gemm/policy.json"
CMD[e2-overhead]="$PYQ -m sparsekern bench overhead --device cuda --dtype bf16,int8 --calls 100 --reps 7 --out $RQ/overhead"
NCU=$(command -v ncu 2>/dev/null || true)
for c in "${CUDA_HOME:-/usr/local/cuda}/bin/ncu" /opt/nvidia/nsight-compute/*/ncu; do [ -z "$NCU" ] && [ -x "$c" ] && NCU=$c; done
if [ -n "$NCU" ]; then
  NCU_CMD="mkdir -p $RQ/decode && $(q "$NCU") --clock-control none --target-processes all --kernel-name regex:skinny24_kernel --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats $PYQ bench/decode_goals.py --profile-one > $RQ/decode/ncu.txt 2>&1 || echo 'ncu failed: see decode/ncu.txt' >&2"
else
  NCU_CMD="mkdir -p $RQ/decode && echo 'ncu not found (on PATH, under \$CUDA_HOME or /opt/nvidia/nsight-compute): no profile' | tee $RQ/decode/ncu.txt >&2"
fi
CMD[e3-decode]="$PYQ -m sparsekern bench gemm --device cuda --preset llama3-8b,llama3-70b --m 1,2,4,8,16 --dtype bf16,int8 --contenders dense,torch_cslt,sk_cslt,sk_spmm24 --warmup 3 --iters 20 --min-iters 5 --max-seconds 0.05 --out $RQ/decode --policy $RQ/decode/policy.json && $PYQ bench/decode_goals.py --gemm $RQ/decode/gemm.json --out $RQ/decode/goals.json && { $NCU_CMD; }"
CMD[f-tests-rest]="$PYTEST $TIMEOUT_OPT -k $(q "$F_EXPR") --junitxml=$RQ/pytest-f.xml tests"
CMAKE_ARCH=${TORCH_CUDA_ARCH_LIST:+TORCH_CUDA_ARCH_LIST=$(q "$TORCH_CUDA_ARCH_LIST") }
CMD[g-ctest]="${CMAKE_ARCH}cmake -S . -B build/cmake-gpu -DCMAKE_BUILD_TYPE=Release -DSPARSEKERN_CUDA=ON -DCMAKE_PREFIX_PATH=\"\$($PYQ -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')\"${NVCC:+ -DCUDA_TOOLKIT_ROOT_DIR=$(q "$(dirname "$(dirname "$NVCC")")")} && cmake --build build/cmake-gpu -j ${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)} && ctest --test-dir build/cmake-gpu --output-on-failure"

planned() {  # the stage's cost in the plan (0 when it will not run)
  local id=$1
  [ -n "${SELECTED[$id]+x}" ] || { echo 0; return; }
  [ "$id" = a2-build ] && [ "$SKIP_BUILD" = 1 ] && { echo 0; return; }
  echo "${EST[$id]}"
}

# ----------------------------------------------------------------------------------------------------- --dry-run
if [ "$DRY" = 1 ]; then
  echo "gpu_validate.sh --dry-run: budget ${BUDGET} s; results would go to $R"
  echo "GPU: $GPU (compute capability ${CAP:-unknown}); TORCH_CUDA_ARCH_LIST=$ARCHS; nvcc: ${NVCC:-not found}; compute-sanitizer: ${SANITIZER:-not found}; ccache: ${CCACHE:-not found}"
  printf '%-14s %7s %8s  %s\n' stage "est(s)" "limit(s)" what
  total=0; used=0; over=()  # used: what a run would spend if every stage took its estimate
  for id in "${IDS[@]}"; do
    p=$(planned "$id")
    note=""
    if [ -z "${SELECTED[$id]+x}" ] && [ "${OPT_IN/ $id /}" != "$OPT_IN" ]; then note="  [opt-in: --stages ${id%%-*}]"
    elif [ -z "${SELECTED[$id]+x}" ]; then note="  [skipped: not in --stages]"
    elif [ "$id" = a2-build ] && [ "$SKIP_BUILD" = 1 ]; then note="  [skipped: --skip-build]"
    elif [ $((used + p)) -gt "$BUDGET" ]; then note="  [would be skipped: budget]"; over+=("$id")
    else used=$((used + p))
    fi
    total=$((total + p))
    printf '%-14s %7s %8s  %s%s\n' "$id" "$p" "${LIMIT[$id]}" "${WHAT[$id]}" "$note"
    printf '%-14s %7s %8s    $ %s\n' "" "" "" "${CMD[$id]}"
  done
  printf '%-14s %7s          (budget %s s)\n' total "$total" "$BUDGET"
  if [ "$total" -gt "$BUDGET" ]; then
    echo "gpu_validate.sh: the stages' estimates total ${total} s, over --budget ${BUDGET} s; a run with this budget" \
         "would skip: ${over[*]} (raise --budget, or choose stages with --stages)" >&2
    exit 1
  fi
  exit 0
fi

# ------------------------------------------------------------------------------------------------------- the run
mkdir -p "$R/logs" || { echo "gpu_validate.sh: cannot create $R" >&2; exit 2; }
TSV="$R/stages.tsv"
if [ -n "$ONLY" ] && [ -s "$TSV" ]; then
  :  # a partial re-run (--stages) into an earlier run's folder: keep its lines; the summary shows the last per stage
else
  printf 'stage\tstatus\tseconds\testimate_s\ttimeout_s\tlog\n' > "$TSV"
fi
if COMMIT=$(git rev-parse HEAD 2>/dev/null); then
  DIRTY=$(git status --porcelain 2>/dev/null | wc -l | tr -d ' ')
else
  COMMIT=${GIT_COMMIT:-unknown}; DIRTY=""  # a copied working tree without .git
fi
json_str() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; }
{
  echo "{"
  echo "  \"format\": \"sparsekern-gpu-validate\","
  echo "  \"date\": $(json_str "$DATE"),"
  echo "  \"started\": $(json_str "$(date -u +%FT%TZ)"),"
  echo "  \"gpu\": $(json_str "$GPU"),"
  echo "  \"gpu_slug\": $(json_str "$SLUG"),"
  echo "  \"compute_capability\": $(json_str "$CAP"),"
  echo "  \"torch_cuda_arch_list\": $(json_str "${TORCH_CUDA_ARCH_LIST:-}"),"
  echo "  \"budget_s\": $BUDGET,"
  echo "  \"stages\": $(json_str "${ONLY:-all}"),"
  echo "  \"skip_build\": $([ "$SKIP_BUILD" = 1 ] && echo true || echo false),"
  echo "  \"git_commit\": $(json_str "$COMMIT"),"
  echo "  \"git_changed_files\": $(json_str "$DIRTY"),"
  echo "  \"nvcc\": $(json_str "$NVCC"),"
  echo "  \"compute_sanitizer\": $(json_str "$SANITIZER"),"
  echo "  \"ccache\": $(json_str "$CCACHE")"
  echo "}"
} > "$R/run.json"

if [ -n "$CCACHE" ]; then
  mkdir -p "$ROOT/build/ccache-bin"
  for n in cc c++ gcc g++; do ln -sf "$CCACHE" "$ROOT/build/ccache-bin/$n"; done
fi
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
TOOLPY=$(command -v python3 2>/dev/null || echo "$PY")  # the summary needs only the standard library

elapsed() { echo $(( $(date +%s) - T0 )); }

summary_fallback() {
  { echo "# GPU validation: $(basename "$R")"; echo
    echo "(fold_gpu_results.py --summary failed; see logs/summary.log)"; echo
    echo '```'; cat "$TSV"; echo '```'; } > "$R/summary.md"
}
checkpoint() {  # after every stage: the summary, and the archive when asked for
  "$TOOLPY" "$ROOT/bench/fold_gpu_results.py" --summary "$R" 2>>"$R/logs/summary.log" >/dev/null || summary_fallback
  if [ -n "$ARCHIVE" ]; then
    mkdir -p "$(dirname "$ARCHIVE")" && tar -czf "$ARCHIVE.tmp" -C "$(dirname "$R")" "$(basename "$R")" 2>/dev/null \
      && mv -f "$ARCHIVE.tmp" "$ARCHIVE"
  fi
}
record() {  # id status seconds timeout (a stage that did not run has no log)
  local log="logs/$1.log"; [ -e "$R/$log" ] || log="-"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${EST[$1]}" "$4" "$log" >> "$TSV"
  printf '== %-13s %-40s %4ss (est %ss; %ss of %ss used)\n' "$1" "$2" "$3" "${EST[$1]}" "$(elapsed)" "$BUDGET"
  checkpoint
}

STAGE_PID=""; STAGE_ID=""; STAGE_START=0; STAGE_T=0
on_signal() {  # the lease's time limit (or ^C): stop the running stage, record it, leave the summary and the archive
  trap - TERM INT HUP
  if [ -n "$STAGE_PID" ]; then
    kill -TERM "$STAGE_PID" 2>/dev/null  # timeout passes it on; the benchmarks write what they measured
    for _ in 1 2 3 4 5 6; do kill -0 "$STAGE_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL "$STAGE_PID" 2>/dev/null
    echo "# cut off by SIG$1 at $(date -u +%FT%TZ)" >> "$R/logs/$STAGE_ID.log"
    rm -f "$R/running.txt"
    record "$STAGE_ID" "cut off (SIG$1)" "$(( $(date +%s) - STAGE_START ))" "$STAGE_T"
  else
    checkpoint
  fi
  echo "gpu_validate.sh: stopped by SIG$1 after $(elapsed) s; what finished is in $R" >&2
  exit 143
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

echo "gpu_validate.sh: results in $R (GPU: $GPU, compute capability ${CAP:-unknown}, TORCH_CUDA_ARCH_LIST=$ARCHS); budget ${BUDGET} s"
FAILED=0
BUILD_BAD=""
for id in "${IDS[@]}"; do
  if [ -z "${SELECTED[$id]+x}" ]; then continue; fi
  rm -f "$R/logs/$id.log"  # a re-run into an earlier folder: no stale log under this run's line
  if [ "$id" = a2-build ] && [ "$SKIP_BUILD" = 1 ]; then record "$id" "skipped: --skip-build" 0 0; continue; fi
  if [ -n "$BUILD_BAD" ] && [ "$id" != a1-versions ]; then record "$id" "skipped: a2-build $BUILD_BAD" 0 0; continue; fi
  left=$(( BUDGET - $(elapsed) ))
  if [ "${EST[$id]}" -gt "$left" ]; then
    record "$id" "skipped: budget (needs ${EST[$id]} s, ${left} s left)" 0 0
    [ "$id" = a2-build ] && BUILD_BAD="skipped for budget"  # no stale extension is tested in its place
    continue
  fi
  t=${LIMIT[$id]}; [ "$t" -gt "$left" ] && t=$left
  log="$R/logs/$id.log"
  { echo "\$ ${CMD[$id]}"; echo "# started $(date -u +%FT%TZ), timeout ${t}s (estimate ${EST[$id]}s)"; } > "$log"
  printf '%s\tstarted %s\ttimeout %ss\n' "$id" "$(date -u +%FT%TZ)" "$t" > "$R/running.txt"
  checkpoint  # a run killed outright (SIGKILL) during this stage still brings back that it was running
  start=$(date +%s)
  # -k 5: after SIGTERM a stage gets 5 s to write what it has (the benchmarks keep the points measured) before SIGKILL.
  # In the background + wait, so that a signal to this script is handled at once (on_signal), not after the stage.
  timeout -k 5 "$t" bash -c "${CMD[$id]}" >> "$log" 2>&1 &
  STAGE_PID=$!; STAGE_ID=$id; STAGE_START=$start; STAGE_T=$t
  wait "$STAGE_PID"
  rc=$?
  STAGE_PID=""
  secs=$(( $(date +%s) - start ))
  rm -f "$R/running.txt"
  case $rc in
    0) status=ok ;;
    124|137) status="timeout (after ${t} s)"; FAILED=$((FAILED + 1)) ;;
    *) status="failed (rc $rc)"; FAILED=$((FAILED + 1)) ;;
  esac
  echo "# finished $(date -u +%FT%TZ): $status in ${secs}s" >> "$log"
  [ "$id" = a2-build ] && [ "$rc" != 0 ] && BUILD_BAD=${status%% (*}
  record "$id" "$status" "$secs" "$t"
done
TOTAL=$(elapsed)
echo "gpu_validate.sh: done in ${TOTAL} s of ${BUDGET}; ${FAILED} stage(s) not ok; $R/summary.md"
echo "fold it into bench/results/ (and the README block): python bench/fold_gpu_results.py $R"
echo
sed -n '/^## Stages/,/^## Tests/p' "$R/summary.md" 2>/dev/null | sed '$d'  # the reply of a lent machine shows the tail
[ "$FAILED" = 0 ]
