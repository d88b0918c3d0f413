#!/usr/bin/env bash
# AddressSanitizer run of the CPU extension: a throwaway clone of this checkout built with -fsanitize=address, then
# the CPU kernel tests under it. The CPU counterpart of compute-sanitizer (bench/gpu_validate.sh). About 3 minutes on
# the 2-core development machine (build ~2 min). Usage: tools/asan_check.sh [pytest args...]
#   default tests: tests/test_spmm_cpu.py tests/test_linear.py tests/test_core_ops.py tests/test_prune_wanda.py tests/test_prune_sparsegpt.py tests/test_prune_stats.py
# libstdc++ is preloaded next to libasan so that ASan's __cxa_throw interceptor finds the real one (without it, the
# first C++ exception - a TORCH_CHECK, or triton's import - aborts with "CHECK failed: asan_interceptors.cpp").
# Deselected: the peak-memory test of SparseGPT (ASan's allocator pads and quarantines blocks, so peaks differ).
# Last run 2026-11-24 (commit after 58891b6): 1233 passed, no ASan report.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d /tmp/sparsekern-asan.XXXXXX)"
trap 'rm -rf "$work"' EXIT
git clone -q "$src" "$work/repo"
cd "$work/repo"
python - <<'PY'
import json
p = "csrc/build_config.json"
d = json.load(open(p))
d["cxx_flags"] = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-fopenmp", "-Wno-unused-function",
                  "-Wno-sign-compare"]
json.dump(d, open(p, "w"), indent=1)
p = "tools/build_config.py"
s = open(p).read()
assert 'link_args.append("-fopenmp")' in s
open(p, "w").write(s.replace('link_args.append("-fopenmp")', 'link_args += ["-fopenmp", "-fsanitize=address"]'))
PY
SPARSEKERN_CUDA=0 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" python setup.py build_ext --inplace -t "$work/build" \
  > "$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(tests/test_spmm_cpu.py tests/test_linear.py tests/test_core_ops.py tests/test_prune_wanda.py tests/test_prune_sparsegpt.py tests/test_prune_stats.py)
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)" \
  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 PYTHONPATH=python \
  python -m pytest -q -p no:cacheprovider -k "not peak_extra_memory" "${tests[@]}"
