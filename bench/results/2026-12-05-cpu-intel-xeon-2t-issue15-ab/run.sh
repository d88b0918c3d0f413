#!/usr/bin/env bash
# Before/after of issue 15 on one quiet machine, one run: the pre-refactor checkout (921fca6, /tmp/sk_old) and the
# current one, alternating, same commands.
set -u
PY=/work/main/.venv/bin/python
OUT=/tmp/bench_ab
COMMON="--device cpu --shapes 11008x4096,4096x11008 --m 1,16,256 --dtype fp32,bf16,int8 --threads 2 --warmup 2 --iters 30 --max-seconds 1.0 --contenders dense,sk_spmm24,sk_linear --no-plot"
for pass in 1 2; do
  for side in old new; do
    if [ $side = old ]; then ROOT=/tmp/sk_old; else ROOT=/work/main; fi
    echo "== gemm pass $pass $side $(date -u +%T)"
    (cd /tmp && PYTHONPATH=$ROOT/python $PY -m sparsekern bench gemm $COMMON --out $OUT/gemm-$side-$pass > $OUT/gemm-$side-$pass.txt 2>&1)
  done
done
for side in old new; do
  if [ $side = old ]; then ROOT=/tmp/sk_old; else ROOT=/work/main; fi
  echo "== prune $side $(date -u +%T)"
  (cd /tmp && PYTHONPATH=$ROOT/python $PY -m sparsekern bench prune --shapes 4096x4096,11008x4096 --methods wanda,sparsegpt --repeats 3 --threads 2 --json $OUT/prune-$side.json > $OUT/prune-$side.txt 2>&1)
done
echo "== done $(date -u +%T)"
