#!/usr/bin/env bash
# Installs what tsp needs from Debian's apt (idempotent and quiet when everything is present),
# then configures and builds with CMake (Release) into ${TSP_BUILD_DIR:-build}.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(cmake g++ make pkg-config openmpi-bin libopenmpi-dev libdnnl-dev ocl-icd-opencl-dev
  libgtest-dev libbenchmark-dev nlohmann-json3-dev libcli11-dev libfmt-dev bible-kjv
  python3-numpy python3-matplotlib libssl-dev)
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
jobs="$(nproc)"
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release ${TSP_CMAKE_ARGS:-} >/dev/null
cmake --build "$build_dir" -j "$jobs" 2>&1 | grep -vE '^\[ *[0-9]+%\]' || true
test "${PIPESTATUS[0]}" -eq 0
