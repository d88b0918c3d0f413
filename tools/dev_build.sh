#!/usr/bin/env bash
# Developer build: CPU-only extension, in place (python/sparsekern/_C*.so), serialised with a lock so that several
# people building in one checkout do not trample each other. Usage: tools/dev_build.sh [--cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ "${1:-}" = "--cuda" ]; then
  # Full CUDA build into build/cuda (not in place): the compile check of every .cu for sm80 + sm90a.
  exec flock /tmp/sparsekern-build.lock env SPARSEKERN_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}" \
    python setup.py build_ext -b build/cuda-lib -t build/cuda-temp
fi
exec flock /tmp/sparsekern-build.lock env SPARSEKERN_CUDA=0 python setup.py build_ext --inplace -t build/cpu-temp
