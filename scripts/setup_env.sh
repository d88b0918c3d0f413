#!/usr/bin/env bash
# Create (or update) the virtual environment VENV, build sparsekern's wheel and install it there.
#
#   scripts/setup_env.sh [VENV]      (default .venv)
#
# The wheel is built with --no-build-isolation against the venv's torch (isolation would fetch another torch).
# CUDA is built when nvcc and a CUDA torch are present (SPARSEKERN_CUDA=0/1 forces it; see setup.py's header).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
if [ ! -f "$VENV/.deps-ok" ] || [ scripts/requirements.txt -nt "$VENV/.deps-ok" ]; then
  echo "== installing dependencies into $VENV"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q -r scripts/requirements.txt
  "$VPY" -m pip install -q --no-deps -r scripts/requirements-nodeps.txt
  touch "$VENV/.deps-ok"
fi

echo "== building the sparsekern wheel (this compiles the C++/CUDA extension; minutes on 2 cores)"
rm -rf dist
start=$(date +%s)
"$VPY" -m pip wheel -q --no-build-isolation --no-deps -w dist . 
echo "   built $(ls dist/*.whl) in $(( $(date +%s) - start )) s"
"$VPY" -m pip install -q --force-reinstall --no-deps dist/*.whl
touch "$VENV/.installed"
