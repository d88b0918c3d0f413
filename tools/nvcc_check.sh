#!/usr/bin/env bash
# Compile one CUDA source (.cu, or a .cpp of csrc/cusparselt) for sm80 and sm90a with the extension's flags, to an
# object in /tmp: a fast compile check of a single file. Usage: tools/nvcc_check.sh csrc/cuda/foo.cu [more...]
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
SP=$(python -c "import sysconfig;print(sysconfig.get_paths()['purelib'])")
TI="$SP/torch/include"
INC=(-Icsrc -Iinclude -I"$TI" -I"$TI/torch/csrc/api/include" -I"$CUDA_HOME/include" -I"$SP/nvidia/cusparselt/include"
     -I"$SP/nvidia/cu13/include" -I"$(python -c 'import sysconfig;print(sysconfig.get_paths()["include"])')")
DEF=(-DSPARSEKERN_WITH_CUDA=1 '-DSPARSEKERN_CUDA_ARCHS="8.0;9.0a"' '-DSPARSEKERN_CUDA_VERSION="13.0"'
     '-DSPARSEKERN_TORCH_VERSION="check"' -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C)
for f in "$@"; do
  out=/tmp/nvcc_check_$(basename "$f").o
  case "$f" in
    *.cu)
      "$CUDA_HOME/bin/nvcc" -c "$f" -o "$out" "${INC[@]}" "${DEF[@]}" -std=c++20 -O3 --expt-relaxed-constexpr \
        --expt-extended-lambda -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ \
        -U__CUDA_NO_BFLOAT16_CONVERSIONS__ -U__CUDA_NO_HALF2_OPERATORS__ --compiler-options -fPIC \
        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a ;;
    *)
      g++ -c "$f" -o "$out" "${INC[@]}" "${DEF[@]}" -std=c++20 -O2 -fPIC -Wall -Wno-sign-compare ;;
  esac
  echo "ok: $f"
done
