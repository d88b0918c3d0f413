#!/usr/bin/env bash
PY=/work/main/.venv/bin/python
OUT=/tmp/bench_ab
COMMON="--device cpu --shapes 11008x4096 --m 1,16,256 --dtype fp32,bf16,int8 --threads 2 --warmup 2 --iters 20 --max-seconds 0.5 --contenders dense,sk_spmm24,sk_linear --no-plot"
for side in new old; do
  if [ $side = old ]; then ROOT=/tmp/sk_old; else ROOT=/work/main; fi
  echo "== gemm pass 2 $side $(date -u +%T)"
  (cd /tmp && PYTHONPATH=$ROOT/python timeout 900 $PY -m sparsekern bench gemm $COMMON --out $OUT/gemm-$side-2 > $OUT/gemm-$side-2.txt 2>&1)
done
for side in new old; do
  if [ $side = old ]; then ROOT=/tmp/sk_old; else ROOT=/work/main; fi
  echo "== prune 11008 $side $(date -u +%T)"
  (cd /tmp && PYTHONPATH=$ROOT/python timeout 600 $PY -m sparsekern bench prune --shapes 11008x4096 --methods wanda,sparsegpt --repeats 3 --budget 30 --threads 2 --json $OUT/prune11008-$side.json > $OUT/prune11008-$side.txt 2>&1)
done
echo "== done $(date -u +%T)"
