#!/usr/bin/env bash
# Installs what tsp needs from Debian's apt (idempotent and quiet when everything is present),
# then configures and builds with CMake (Release) into ${TSP_BUILD_DIR:-build}.
#   scripts/setup.sh             everything: the packages of the tests, sanitizers and fuzzers too,
#                                and every target (library, CLI, tests, benchmarks)
#   scripts/setup.sh TARGET...   only the packages the library and the CLI need, and only those
#                                targets (scripts/run.sh builds just `tsp`: a first run does not
#                                compile the test suite and the benchmarks)
# TSP_CMAKE_ARGS adds configure options (they win over the ones set here).
set -euo pipefail
cd "$(dirname "$0")/.."

# The library and the CLI (and the demo corpus).
packages=(cmake g++ make ninja-build pkg-config openmpi-bin libopenmpi-dev libdnnl-dev
  ocl-icd-opencl-dev nlohmann-json3-dev libcli11-dev libfmt-dev bible-kjv libssl-dev)
# Tests, benchmarks, the sanitizer build's and the fuzzers' clang (scripts/test.sh), and
# Boost.Context for the CUDA emulation's fibers (tests/cuda_emulation/).
test_packages=(libgtest-dev libbenchmark-dev python3-numpy python3-matplotlib clang-14
  libclang-rt-14-dev libboost-context-dev)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || packages+=("${test_packages[@]}")

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
fi

build_dir="${TSP_BUILD_DIR:-build}"
# nproc obeys OMP_NUM_THREADS, which scripts/env.sh sets to 1 for the ranks: ignore it here.
jobs="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
options=(-DCMAKE_BUILD_TYPE=Release)
if [ ${#targets[@]} -eq 0 ]; then
  options+=(-DTSP_BUILD_TESTS=ON -DTSP_BUILD_BENCH=ON)
elif [ ! -f "$build_dir/CMakeCache.txt" ]; then
  # A first build for chosen targets: the test and benchmark packages may be absent, so leave
  # those directories out (a later full set-up turns them on; the library is not rebuilt).
  options+=(-DTSP_BUILD_TESTS=OFF -DTSP_BUILD_BENCH=OFF)
fi
# Ninja for a new build directory: one job graph for all targets keeps both cores busy where
# make's per-target steps leave one waiting (an existing directory keeps its generator).
[ -f "$build_dir/CMakeCache.txt" ] || options+=(-G Ninja)
# ccache, when installed, makes repeated builds (and the sanitizer build) incremental.
command -v ccache >/dev/null && options+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S . -B "$build_dir" "${options[@]}" ${TSP_CMAKE_ARGS:-} >/dev/null
target_args=()
[ ${#targets[@]} -eq 0 ] || target_args=(--target "${targets[@]}")
cmake --build "$build_dir" -j "$jobs" "${target_args[@]}" 2>&1 |
  grep -vE '^\[ *[0-9]+%\]|^\[[0-9]+/[0-9]+\] ' || true
test "${PIPESTATUS[0]}" -eq 0
