#!/usr/bin/env bash
# The main job: set-up (apt, then a build of the tsp executable alone), the demo corpus, then train
# a small Llama on the King James Bible with the TSP layout on 4 local ranks, and print a short
# sample from the trained model.
# Extra arguments are passed to `tsp train` (e.g. --steps 100, --layout tp).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh tsp  # only the executable: the tests and benchmarks are scripts/test.sh's
scripts/prepare_data.sh data/kjv.txt
source scripts/env.sh
build="${TSP_BUILD_DIR:-build}"
ranks="${TSP_RANKS:-4}"
out="${TSP_OUT:-out/demo}"
mkdir -p "$out"

echo "== training: tsp layout on $ranks ranks (checkpoint in $out/checkpoint, metrics in $out/metrics.jsonl)"
mpiexec -n "$ranks" "$build/tsp" train --preset demo --data data/kjv.txt --layout tsp \
  --save "$out/checkpoint" --metrics "$out/metrics.jsonl" "$@"

echo "== sample from the trained model (tsp layout, $ranks ranks, temperature 0.8)"
mpiexec -n "$ranks" "$build/tsp" generate --model "$out/checkpoint" --layout tsp \
  --prompt "And God said, " --max-new 200 --temperature 0.8 --seed 1
