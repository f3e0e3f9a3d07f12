#!/usr/bin/env bash
# Runs the benchmark tables (after set-up and build): GEMM, attention, collectives at 2 and 4
# ranks, and, when given --all, the layout comparison (`tsp bench`) and prefill/decode.
# Timings on a shared 2-core machine are noisy: each row is a median of repeats.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
b="${TSP_BUILD_DIR:-build}"
echo "### GEMM (one thread)"
OMP_NUM_THREADS=1 "$b/bench/bench_matmul"
echo "### attention (one thread)"
OMP_NUM_THREADS=1 "$b/bench/bench_attention"
for n in 2 4; do
  echo "### collectives, $n ranks"
  mpiexec -n "$n" "$b/bench/bench_collectives"
done
if [ "${1:-}" = "--all" ]; then
  if [ -x "$b/bench/bench_generate" ]; then
    echo "### prefill and decode, 4 ranks"
    mpiexec -n 4 "$b/bench/bench_generate"
  fi
  echo "### layouts side by side, 4 ranks"
  "$b/tsp" init --preset demo --seed 1 --out out/bench-demo >/dev/null
  mpiexec -n 4 "$b/tsp" bench --model out/bench-demo --layouts single,tp,sp,tp-sp,tsp,fsdp-cp \
    --seq 256,1024
fi
