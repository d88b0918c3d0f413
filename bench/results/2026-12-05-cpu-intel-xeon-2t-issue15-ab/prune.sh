#!/usr/bin/env bash
PY=/work/main/.venv/bin/python
OUT=/tmp/bench_ab
for side in old new old new; do
  if [ $side = old ]; then ROOT=/tmp/sk_old; else ROOT=/work/main; fi
  n=$( ls $OUT/prune-$side-*.json 2>/dev/null | wc -l )
  echo "== prune $side $(date -u +%T)"
  (cd /tmp && PYTHONPATH=$ROOT/python timeout 600 $PY -m sparsekern bench prune --shapes 4096x4096 --methods wanda,sparsegpt --repeats 3 --budget 30 --threads 2 --json $OUT/prune-$side-$n.json > $OUT/prune-$side-$n.txt 2>&1)
done
echo "== done $(date -u +%T)"
