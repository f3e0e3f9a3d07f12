#!/usr/bin/env bash
# Set-up, build, then every test (single-rank and multi-rank under mpiexec at 1, 2, 4 and 8 ranks).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cd "${TSP_BUILD_DIR:-build}"
ctest --output-on-failure -j 2 --timeout 600 "$@"
