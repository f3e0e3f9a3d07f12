#!/usr/bin/env bash
# The GPU check (issue 10 §5): on a machine with an NVIDIA GPU, runs every GPU test and the GPU
# benchmarks next to PyTorch's, profiles the attention kernels (ours and PyTorch's) with Nsight
# Compute, runs the flash kernels under compute-sanitizer, and writes a report:
#
#   scripts/gpu_check.sh OUTDIR [--prebuilt DIR] [--budget SECONDS] [--only SECTIONS]
#   (environment: TSP_GPU_CHECK_BUDGET as --budget; TSP_GPU_ONLY as --only; TSP_GPU_STEP_CAP caps
#    every step's limit; TSP_GPU_TESTS_SHARE the percentage of the budget after which no test
#    starts, default 55)
#
#   --only SECTIONS       a comma-separated subset of the sections, run in this order:
#                         tests     every GPU test
#                         bench     the benchmarks next to PyTorch's, tsp bench
#                         profile   Nsight Compute (ncu) on the attention kernels at S = 8192:
#                                   flash v1, v2, cuDNN's and PyTorch's (the "full" metric set)
#                         sanitize  compute-sanitizer memcheck, racecheck and synccheck on the
#                                   flash kernels' tests, memcheck on the backend's op tests
#                         (default: all four). A second call on a warm machine can run what the
#                         first one's budget left out: --only profile,sanitize.
#
# OUTDIR gets at most 8 files (what the device tool brings back of $OUT):
#   OUTDIR/report.md      environment, every step PASS / FAIL / SKIP (with why) and its time, the
#                         benchmark tables with the ratios to PyTorch and the targets, the kernel
#                         profiles' summary (time, occupancy, tensor-pipe and issue activity,
#                         shared-memory wavefronts and conflicts, spills, the top stall reasons
#                         and the instructions the warps stall at)
#   OUTDIR/steps.json     the same steps, machine-readable
#   OUTDIR/block_profile.txt   per-op GPU times of one block step (bench_block --profile)
#   OUTDIR/results.tar.gz raw/: the benchmark rows (attention.json, attention_docs.json,
#                         attention_zigzag.json, block.json, tsp_bench.json: JSON lines) and
#                         raw/ncu/: each profile's report (.ncu-rep, left out if the archive would
#                         pass 15 MiB), its details page (.details.txt), metrics (.raw.csv) and
#                         per-instruction SASS page (.sass.csv); logs/: every step's log, env.txt
#
# Binaries, in this order: --prebuilt DIR (a build tree, an unpacked bundle, or a folder holding
# bundle.tar.xz); else .gpu/bundle.tar.xz (made by scripts/gpu_bundle.sh on the CPU machine and
# carried: run(command="scripts/gpu_check.sh $OUT", carry=[".gpu"])); else a CUDA build made
# here with cmake (needs MPI and oneDNN on this machine). The CUDA libraries come from this
# machine: PyTorch's nvidia-* wheels (NCCL, cuBLAS, cudart) or /usr/local/cuda.
#
# Every step has a time limit, and the whole run a budget (default 450 s, under the 8 minutes the
# issue allows); a step that fails or hangs does not stop the next, and a step the budget leaves
# no time for reports SKIP. Without a GPU (here: the CPU machine) every GPU step reports SKIP (no
# device): a dry run of the plumbing. The exit status is non-zero only when a step FAILED.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

usage() { sed -n '2,46p' "$0"; exit 2; }
[ $# -ge 1 ] || usage
out=$1
shift
prebuilt=""
budget=${TSP_GPU_CHECK_BUDGET:-450}
only=${TSP_GPU_ONLY:-tests,bench,profile,sanitize}
while [ $# -gt 0 ]; do
  case $1 in
    --prebuilt) prebuilt=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    -h | --help) usage ;;
    *) echo "gpu_check: unknown argument '$1'" >&2; usage ;;
  esac
done
for section in ${only//,/ }; do
  case $section in
    tests | bench | profile | sanitize) ;;
    *) echo "gpu_check: --only: unknown section '$section' (tests, bench, profile, sanitize)" >&2; exit 2 ;;
  esac
done
want() { [[ ",$only," == *",$1,"* ]]; }
mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd)
# logs/ and raw/ become OUTDIR/results.tar.gz at the end.
results=$(mktemp -d /tmp/tsp-gpu-results.XXXXXX)
logs=$results/logs raw=$results/raw
mkdir -p "$logs" "$raw/ncu"
# The unpacked bundle, a build made here, the models of tsp bench: removed at the end.
work=$(mktemp -d /tmp/tsp-gpu-check.XXXXXX)
t_start=$SECONDS
steps_tsv="$logs/steps.tsv"
: >"$steps_tsv"
failed=0

log() { echo "[gpu_check $(printf '%3d' $((SECONDS - t_start)))s] $*"; }
remaining() { echo $((budget - (SECONDS - t_start))); }

# record NAME STATUS SECONDS NOTE
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >>"$steps_tsv"
  [ "$2" != FAIL ] || failed=1
  log "$2  $1 (${3}s)${4:+: $4}"
}

# step NAME LIMIT_S COMMAND...: runs COMMAND under timeout (at most LIMIT_S and what the budget
# has left), output in $logs/NAME.log. PASS on exit 0, SKIP when it printed the GPU tests' skip
# line "[tsp-cuda-test] SKIPPED ..." (and exited 0), FAIL otherwise (the note says why).
step() {
  local name=$1 limit=$2
  shift 2
  local left
  left=$(remaining)
  if [ "$left" -lt 20 ]; then
    record "$name" SKIP 0 "time budget of ${budget}s used up"
    return 0
  fi
  [ "$limit" -le $((left - 10)) ] || limit=$((left - 10))
  # TSP_GPU_STEP_CAP: a shorter limit for every step (a first run on a new machine, where a hang
  # must not eat the budget).
  [ "${TSP_GPU_STEP_CAP:-0}" -le 0 ] || [ "$limit" -le "$TSP_GPU_STEP_CAP" ] || limit=$TSP_GPU_STEP_CAP
  local f="$logs/${name//[^A-Za-z0-9_.-]/_}.log" t0=$SECONDS rc
  log "run   $name (limit ${limit}s)"
  # </dev/null: a step must not read the caller's stdin (the list of shell tests being read).
  timeout --kill-after=10 "$limit" "$@" >"$f" 2>&1 </dev/null
  rc=$?
  local dt=$((SECONDS - t0)) note
  if [ $rc -eq 0 ] && grep -q '\[tsp-cuda-test\] SKIPPED' "$f"; then
    record "$name" SKIP $dt "$(grep -m1 -o '\[tsp-cuda-test\] SKIPPED.*' "$f" | sed 's/^\[tsp-cuda-test\] SKIPPED:\? *//')"
  elif [ $rc -eq 0 ]; then
    note=$(grep -m1 -oE '^\[  PASSED  \] [0-9]+ tests?' "$f" | sed 's/\[  PASSED  \] //')
    record "$name" PASS $dt "${note:+$note passed}"
  else
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
      note="timed out after ${limit}s"
    else
      note="exit $rc"
    fi
    local first
    # (compute-sanitizer's findings: "========= Invalid ...", "Error: Race ...", "Barrier error";
    # ncu's: "==ERROR== ...")
    first=$(grep -m3 -E '^\[  FAILED  \] [A-Za-z]|^========= (Invalid|Error|Race|Barrier|Program hit)|==ERROR==|error|Error' \
      "$f" | tr '\n' ' ' | cut -c1-300)
    record "$name" FAIL $dt "$note${first:+; $first}"
  fi
  return 0
}
skip() { record "$1" SKIP 0 "$2"; }

# write_results [--print]: OUTDIR/results.tar.gz and OUTDIR/report.md (and steps.json) from what
# the steps so far left; after each section, so that a run stopped from outside (the device
# tool's time limit) still brings back what its finished sections measured. The device tool brings
# back at most 8 files of $OUT, 16 MiB each: the raw files travel as one archive, without the
# binary Nsight Compute reports if they would take it past 15 MiB (their text and CSV exports
# stay in it).
write_results() {
  local note=""
  tar -C "$results" -czf "$out/results.tar.gz" logs raw 2>/dev/null
  if [ "$(stat -c %s "$out/results.tar.gz")" -gt $((15 * 1024 * 1024)) ]; then
    tar -C "$results" --exclude='*.ncu-rep' -czf "$out/results.tar.gz" logs raw 2>/dev/null
    note="The Nsight Compute reports (.ncu-rep) were left out of results.tar.gz: over 15 MiB with them."
  fi
  python3 "$repo/scripts/gpu_report.py" --out "$out" --results "$results" \
    --elapsed "$((SECONDS - t_start))" --budget "$budget" --note "$note" "$@"
}
trap 'log "stopped from outside: writing what the finished steps left"; write_results; rm -rf "$results" "$work"; exit 143' TERM INT

# ---- environment --------------------------------------------------------------------------------
env_txt="$logs/env.txt"
have_gpu=0
# (Under pipefail, `producer | grep -q` can fail when grep stops reading before the producer has
# written everything: the producer's output is taken whole first.)
if command -v nvidia-smi >/dev/null && gpus=$(nvidia-smi -L 2>/dev/null) && grep -q GPU <<<"$gpus"; then
  have_gpu=1
fi
{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(hostname)  kernel $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') ($(nproc) cores), avx512_bf16: $(grep -q avx512_bf16 /proc/cpuinfo && echo yes || echo no)"
  echo "os: $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME")"
  echo "repo: $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')"
  if [ $have_gpu -eq 1 ]; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  else
    echo "GPU: none (nvidia-smi: $(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | head -1 || echo 'not installed'))"
  fi
  echo "nvcc: $( (nvcc --version || /usr/local/cuda/bin/nvcc --version) 2>/dev/null | grep -o 'release [0-9.]*' || echo none)"
  echo "python3: $(python3 --version 2>&1), torch: $(python3 -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>/dev/null || echo none)"
} >"$env_txt" 2>&1

# ---- the binaries -------------------------------------------------------------------------------
bundle=""
build=""
if [ -n "$prebuilt" ]; then
  if [ -f "$prebuilt/bundle.tar.xz" ]; then
    bundle="$prebuilt/bundle.tar.xz"
  elif [ -x "$prebuilt/build/tsp" ]; then
    build="$prebuilt/build" && bundle_root="$prebuilt"
  elif [ -x "$prebuilt/tsp" ]; then
    build="$prebuilt"
  else
    echo "gpu_check: --prebuilt $prebuilt holds neither bundle.tar.xz, build/tsp nor tsp" >&2
    exit 2
  fi
elif [ -f "$repo/.gpu/bundle.tar.xz" ]; then
  bundle="$repo/.gpu/bundle.tar.xz"
fi
bundle_root=${bundle_root:-}
if [ -n "$bundle" ]; then
  bundle_root="$work/bundle"
  mkdir -p "$bundle_root"
  step unpack_bundle 120 bash -c "xz -dc '$bundle' | tar -C '$bundle_root' -xf - ||
    python3 -c 'import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' '$bundle' '$bundle_root'"
  build="$bundle_root/build"
  cat "$bundle_root/MANIFEST.txt" >"$logs/bundle_manifest.txt" 2>/dev/null
elif [ -z "$build" ]; then
  if [ $have_gpu -eq 1 ]; then
    # A build here: needs MPI and oneDNN (the GPU image usually has neither: use the bundle).
    build="$work/build"
    gen=()
    command -v ninja >/dev/null && gen=(-G Ninja)
    step configure 120 cmake -S "$repo" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
      -DTSP_WITH_CUDA=ON -DTSP_BUILD_TESTS=ON -DTSP_BUILD_BENCH=ON -DTSP_EMULATE_CUDA=OFF
    # (tests/cuda_emulation/ holds the emulation's own tests: CPU builds only, not GPU tests.)
    mapfile -t targets < <(cd "$repo" && find tests -path tests/cuda_emulation -prune -o \
      \( -name 'cuda_*_test.cpp' -o -name '*_probe.cpp' \) -print | xargs -r -n1 basename |
      sed 's/\.cpp$//')
    step build 300 cmake --build "$build" -j "$(nproc)" --target tsp bench_attention bench_block "${targets[@]}"
  else
    skip build "no device (and no .gpu/bundle.tar.xz or --prebuilt): nothing to build for"
  fi
fi

# ---- library paths ------------------------------------------------------------------------------
# The CUDA libraries: the toolkit's, then PyTorch's nvidia-* wheels (NCCL lives only there on the
# GPU image). The first folder holding each library wins.
py_dirs=$(python3 - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
dirs = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, '*', 'lib')) + glob.glob(os.path.join(r, '*', '*', 'lib'))):
        dirs.append(d)
print(' '.join(dirs))
EOF
)
lib_dirs=()
[ -n "$bundle_root" ] && lib_dirs+=("$bundle_root/openmpi/lib" "$bundle_root/lib")
[ -n "$build" ] && lib_dirs+=("$build")
# libcudnn.so.9: loaded at run time by the cuDNN attention path (TSP_CUDA_FLASH=cudnn), from the
# nvidia-cudnn-cu13 wheel (nvidia/cudnn/lib) on the GPU image. cuDNN 9.19's attention engines for
# SM 9.0 are all runtime-compiled: it dlopens libnvrtc.so.13 (which loads its builtins library)
# from another wheel's folder; without them every plan is refused and the path falls back to v1.
have_cudnn=0
for lib in libcudart.so.13 libcublasLt.so.13 libcublas.so.13 libnccl.so.2 libcudnn.so.9 \
  libnvrtc.so.13 libnvrtc-builtins.so.13.0; do
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda-13.0/lib64 /usr/local/cuda-13.0/lib $py_dirs; do
    if [ -e "$d/$lib" ]; then
      [[ " ${lib_dirs[*]} " == *" $d "* ]] || lib_dirs+=("$d")
      [ "$lib" != libcudnn.so.9 ] || have_cudnn=1
      echo "$lib: $d" >>"$env_txt"
      break
    fi
  done
done
known_libs=$(ldconfig -p 2>/dev/null)
if ! grep -q 'libcuda\.so\.1 ' <<<"$known_libs"; then
  for d in /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu /usr/lib64; do
    [ -e "$d/libcuda.so.1" ] && lib_dirs+=("$d") && break
  done
fi
# Libraries the image probably has (libcrypto, libgomp): the bundle's copies only where it has not.
if [ -n "$bundle_root" ] && [ -d "$bundle_root/lib-opt" ]; then
  for f in "$bundle_root"/lib-opt/*; do
    [ -e "$f" ] || continue
    n=$(basename "$f")
    grep -q "^[[:space:]]*$n " <<<"$known_libs" || ln -sf "$f" "$bundle_root/lib/$n"
  done
fi
LD_LIBRARY_PATH=$(IFS=:; echo "${lib_dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
if [ -n "$bundle_root" ] && [ -x "$bundle_root/openmpi/bin/mpiexec" ]; then
  export PATH="$bundle_root/openmpi/bin:$PATH" OPAL_PREFIX="$bundle_root/openmpi"
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export OMPI_MCA_pml=ob1 PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe
mpi_version=$(mpiexec --version 2>/dev/null | head -1 || echo none)
case $mpi_version in
  *"Open MPI) 4"* | *"OpenRTE) 4"*) export OMPI_MCA_btl=self,vader ;;
  *) export OMPI_MCA_btl=self,sm ;;
esac
{
  echo "mpiexec: $(command -v mpiexec || echo none): $mpi_version"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "binaries: ${build:-none}"
  [ -f "$logs/bundle_manifest.txt" ] && sed -n '1,4p' "$logs/bundle_manifest.txt"
} >>"$env_txt"
cat "$env_txt"

have_bin=0
[ -n "$build" ] && [ -x "$build/tsp" ] && have_bin=1
if [ $have_bin -eq 1 ]; then
  step libraries 30 bash -c "
    for f in '$build/tsp' '$build/libtsp_lib.so' '$build'/bench/bench_* '$build'/tests/cuda_*; do
      [ -e \"\$f\" ] || continue
      m=\$(ldd \"\$f\" | grep 'not found') && { echo \"\$f: \$m\"; bad=1; }
    done
    [ -z \"\${bad:-}\" ] && echo 'every library resolves'"
  if command -v cuobjdump >/dev/null; then
    step device_code 30 bash -c "cuobjdump --list-elf '$build/libtsp_lib.so' | sort -u | head -20;
      cuobjdump --list-ptx '$build/libtsp_lib.so' | sort -u | head -5"
  fi
fi

# ---- GPU tests ----------------------------------------------------------------------------------
# Each cuda_* test executable directly (the same executables and rank counts ctest -L cuda runs),
# multi-rank ones at the counts of their "// tsp-test-ranks:" line (default 1 2 4 8), all on this
# one GPU. OMP threads: the cores shared among the ranks (the CPU references run in the tests).
# Order: what never ran on a GPU and what the issue checks first, so that the tests' share of the
# budget ends on the least needed ones; every executable not named below runs after them.
cores=$(nproc)
test_env=(env TSP_POISON_ALLOCATIONS=1 GTEST_COLOR=no)
tests_deadline=$((budget * ${TSP_GPU_TESTS_SHARE:-55} / 100))
# A gtest executable's processes: its gtest filters, one process each (a kernel fault poisons the
# CUDA context of its process, so the flash v2 and cuDNN tests, never run on a GPU yet, run apart
# from the v1 ones), or the whole executable.
segments_of() {
  case $1 in
    cuda_attention_test) echo "-CudaFlash.*/v2:CudaAttention.Cudnn* CudaFlash.*/v2 CudaAttention.Cudnn*" ;;
    *) echo "*" ;;
  esac
}
# run_test NAME [VAR=VALUE ...]: the executable build/tests/NAME (its segments; MPI ones at their
# rank counts, or TSP_GPU_RANKS, with the gtest filter TSP_GPU_FILTER) or the shell test NAME.sh,
# with the extra environment given.
run_test() {
  local name=$1 bin src ranks n seg label
  shift
  local extra=("$@") tag=""
  [ ${#extra[@]} -eq 0 ] || tag=" (${extra[*]})"
  if [ $((SECONDS - t_start)) -gt $tests_deadline ]; then
    skip "test $name$tag" "time budget (tests get ${tests_deadline}s of ${budget}s)"
    return 0
  fi
  bin="$build/tests/$name"
  if [ -x "$bin" ] && [[ $name == *_mpi_test ]]; then
    src=$(find "$repo/tests" -name "$name.cpp" | head -1)
    ranks="1 2 4 8"
    if [ -n "$src" ] && grep -q '^// tsp-test-ranks:' "$src"; then
      ranks=$(grep -m1 '^// tsp-test-ranks:' "$src" | sed 's|^// tsp-test-ranks:||')
    fi
    [ -z "${TSP_GPU_RANKS:-}" ] || ranks=$TSP_GPU_RANKS
    for n in $ranks; do
      step "test $name np$n$tag" 180 "${test_env[@]}" "${extra[@]}" \
        OMP_NUM_THREADS=$((cores / n > 0 ? cores / n : 1)) mpiexec -n "$n" --oversubscribe "$bin" \
        --gtest_filter="${TSP_GPU_FILTER:-*}"
    done
  elif [ -x "$bin" ]; then
    local segs
    read -ra segs <<<"$(segments_of "$name")"  # read -a: no pathname expansion of the filters
    for seg in "${segs[@]}"; do
      label="test $name$tag"
      [ "$seg" = "*" ] || label="test $name [$seg]$tag"
      step "$label" 180 "${test_env[@]}" "${extra[@]}" OMP_NUM_THREADS=$((cores > 8 ? 8 : cores)) \
        "$bin" --gtest_filter="$seg"
    done
  else
    src=$(find "$repo/tests" -name "$name.sh" | head -1)
    if [ -z "$src" ]; then
      record "test $name" FAIL 0 "no executable $bin and no tests/**/$name.sh"
      return 0
    fi
    step "test $name$tag" 240 "${test_env[@]}" "${extra[@]}" bash "$src" "$build" "$repo"
  fi
}
run_tests() {
  local first=(cuda_backend_test cuda_gemm_test cuda_attention_test cuda_collectives_mpi_test
    cuda_layouts_mpi_test cuda_train_test cuda_generate_test cuda_memory_mpi_test) name sh
  for name in "${first[@]}"; do run_test "$name"; done
  # Every layout with head dim 64 (the test whose attention takes the tensor-core paths) under
  # the other attention paths (v1, the default, ran above).
  TSP_GPU_RANKS="2 4" TSP_GPU_FILTER='*FlashSizedHeads*' run_test cuda_layouts_mpi_test TSP_CUDA_FLASH=v2
  if [ $have_cudnn -eq 1 ]; then
    TSP_GPU_RANKS="2 4" TSP_GPU_FILTER='*FlashSizedHeads*' run_test cuda_layouts_mpi_test TSP_CUDA_FLASH=cudnn
  else
    skip "test cuda_layouts_mpi_test (TSP_CUDA_FLASH=cudnn)" "no libcudnn.so.9 on this machine"
  fi
  # Any other GPU test (added after this list was written).
  for sh in "$build"/tests/cuda_*_test "$repo"/tests/*/cuda_*_test.sh; do
    [ -e "$sh" ] || continue
    name=$(basename "$sh" .sh)
    [[ " ${first[*]} " == *" $name "* ]] || run_test "$name"
  done
}
if ! want tests; then
  :
elif [ $have_bin -eq 1 ]; then
  run_tests
else
  skip "GPU tests" "no binaries (see the build step)"
fi

write_results

# ---- benchmarks ---------------------------------------------------------------------------------
sizes=4096,8192,16384,32768
block_args=(--h 4096 --heads 32 --kv-heads 8 --ffn 14336 --seq 8192 --repeats 5)
if ! want bench; then
  :
elif [ $have_gpu -eq 1 ] && [ $have_bin -eq 1 ]; then
  # --flash all: v1, v2 and cudnn (cuDNN's fused attention for the calls it covers; the
  # benchmark's positions 0..S-1 are covered; the rows are left out, with a note, without cuDNN).
  step "bench attention tsp" 170 bash -c "set -o pipefail; '$build/bench/bench_attention' --device cuda --dtype bf16 --flash all \
    --sizes $sizes --heads 32 --kv-heads 8 --head-dims 128 --repeats 5 --json | tee -a '$raw/attention.json'"
  # Packed documents of 4K tokens in a 32K row (issue 11): the flash kernels skip the key tiles
  # outside a query tile's documents, so the time should fall towards 1/8 of the row without them.
  # cudnn rows here run v1 (documents are not covered by the cuDNN path).
  step "bench attention tsp documents" 90 bash -c "set -o pipefail; '$build/bench/bench_attention' --device cuda --dtype bf16 --flash all \
    --sizes 32768 --doc-len 4096 --heads 32 --kv-heads 8 --head-dims 128 --repeats 5 --json | tee -a '$raw/attention_docs.json'"
  # One rank's call of the sequence-parallel layouts at D = 4 (its two zigzag chunks against the
  # all-gathered keys in rank order): the cuDNN path cuts it into one piece per chunk.
  step "bench attention tsp zigzag" 90 bash -c "set -o pipefail; '$build/bench/bench_attention' --device cuda --dtype bf16 --flash all \
    --sizes 32768 --zigzag 4 --heads 32 --kv-heads 8 --head-dims 128 --repeats 5 --json | tee -a '$raw/attention_zigzag.json'"
  step "bench attention torch" 120 bash -c "set -o pipefail; python3 '$repo/bench/torch_attention.py' --sizes $sizes \
    --heads 32 --kv-heads 8 --head-dim 128 --repeats 5 --json | tee -a '$raw/attention.json'"
  step "bench block tsp" 150 bash -c "set -o pipefail; '$build/bench/bench_block' --device cuda --dtype bf16 \
    ${block_args[*]} --json | tee -a '$raw/block.json'"
  # The same block keeping the normed inputs and the MLP activations, as PyTorch's autograd does
  # (--recompute none: no gate/up GEMMs replayed in backward), then one step of it with every
  # backend call timed (bench_block --profile; its tables go to block_profile.txt).
  step "bench block tsp none" 150 bash -c "set -o pipefail; '$build/bench/bench_block' --device cuda --dtype bf16 \
    ${block_args[*]} --recompute none --json | tee -a '$raw/block.json'"
  step "bench block tsp profile" 150 bash -c "set -o pipefail; '$build/bench/bench_block' --device cuda --dtype bf16 \
    ${block_args[*]} --repeats 1 --recompute none --profile --json >/dev/null 2>'$out/block_profile.txt'"
  step "bench block torch" 120 bash -c "set -o pipefail; python3 '$repo/bench/torch_block.py' --device cuda --dtype bf16 \
    ${block_args[*]} --json | tee -a '$raw/block.json'"
  # tsp bench, one GPU, layout single: the demo preset and a 1B-class model (Llama 3.2 1B's shape,
  # random weights).
  cat >"$work/llama1b.json" <<'EOF'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
 "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
 "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
 "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": true,
 "hidden_act": "silu", "torch_dtype": "bfloat16"}
EOF
  step "tsp init demo" 60 "$build/tsp" init --preset demo --seed 1 --out "$work/demo"
  step "tsp bench demo" 90 bash -c "set -o pipefail; mpiexec -n 1 '$build/tsp' bench --model '$work/demo' --device cuda \
    --layouts single --seq 1024,4096 --repeats 3 --json | tee -a '$raw/tsp_bench.json'"
  step "tsp bench 1b" 120 bash -c "set -o pipefail; mpiexec -n 1 '$build/tsp' bench --config '$work/llama1b.json' \
    --device cuda --layouts single --seq 2048 --repeats 3 --json | tee -a '$raw/tsp_bench.json'"
else
  why="no device"
  [ $have_gpu -eq 1 ] && why="no binaries"
  for s in "bench attention tsp" "bench attention tsp documents" "bench attention tsp zigzag" \
    "bench attention torch" \
    "bench block tsp" "bench block tsp none" "bench block tsp profile" "bench block torch" \
    "tsp bench demo" "tsp bench 1b"; do
    skip "$s" "$why"
  done
fi

write_results

# ---- kernel profiles (Nsight Compute) ---------------------------------------------------------
# What the benchmarks cannot say: why a kernel is as fast as it is. ncu replays each chosen kernel
# launch and reads the hardware counters ("full" set: throughputs, occupancy, pipe use, shared
# memory wavefronts and bank conflicts, local-memory (spill) traffic, warp stall reasons, and per
# SASS instruction where the warps stall), at the card's own clocks (--clock-control none, as in
# the benchmarks). The same problem for each: S = 8192, 32 query heads on 8 KV heads, d = 128,
# bf16, causal; our flash v1, v2 and the cuDNN path (bench_attention: its warm-up forward and
# backward are the first launches) and PyTorch's SDPA flash kernels (torch_attention.py: a probe
# forward, then the warm-up forward and backward), side by side in report.md.
find_tool() {  # NAME: on PATH, in the CUDA toolkit, or in an Nsight Compute install
  command -v "$1" 2>/dev/null ||
    ls -d /usr/local/cuda/bin/"$1" /opt/nvidia/nsight-compute/*/"$1" /usr/local/cuda/nsight-compute*/"$1" 2>/dev/null | tail -1
}
# why_not TOOL_PATH TOOL_NAME: why a section needing the GPU, the binaries and that tool cannot run
# (nothing when it can).
why_not() {
  if [ $have_gpu -eq 0 ]; then
    echo "no device"
  elif [ $have_bin -eq 0 ]; then
    echo "no binaries"
  elif [ -z "$1" ]; then
    echo "no $2 on this machine"
  fi
}
# profile NAME COUNT REGEX COMMAND...: the first COUNT launches whose kernel name matches REGEX,
# into raw/ncu/NAME.ncu-rep, exported as NAME.details.txt, NAME.raw.csv and NAME.sass.csv.
profile() {
  local name=$1 count=$2 regex=$3
  shift 3
  step "profile $name" 150 "$ncu_bin" --set full --import-source yes --clock-control none \
    --kernel-name "regex:$regex" --launch-count "$count" --force-overwrite \
    --export "$raw/ncu/$name" "$@"
  local rep="$raw/ncu/$name.ncu-rep"
  [ -s "$rep" ] || return 0
  timeout 60 "$ncu_bin" --import "$rep" --page details >"$raw/ncu/$name.details.txt" 2>&1
  timeout 60 "$ncu_bin" --import "$rep" --page raw --csv --print-units base >"$raw/ncu/$name.raw.csv" 2>&1
  timeout 60 "$ncu_bin" --import "$rep" --page source --csv --print-source sass \
    >"$raw/ncu/$name.sass.csv" 2>&1
  return 0
}
profile_steps=("profile attention_v1" "profile attention_v2" "profile attention_cudnn" "profile attention_torch")
ncu_bin=$(find_tool ncu)
why=$(why_not "$ncu_bin" "ncu (Nsight Compute)")
if ! want profile; then
  :
elif [ -n "$why" ]; then
  for s in "${profile_steps[@]}"; do skip "$s" "$why"; done
else
  echo "ncu: $ncu_bin ($("$ncu_bin" --version 2>/dev/null | tail -1))" >>"$env_txt"
  att_args=(--device cuda --dtype bf16 --sizes 8192 --heads 32 --kv-heads 8 --head-dims 128 --repeats 1)
  # v1: forward, backward. v2: forward, the backward's prep kernel (dO in bf16, D = dO·o), backward.
  profile attention_v1 2 'flash_(forward|backward)_kernel' "$build/bench/bench_attention" "${att_args[@]}" --flash v1
  profile attention_v2 3 'flash_(forward|backward)_v2_kernel|bwd_prep_kernel' \
    "$build/bench/bench_attention" "${att_args[@]}" --flash v2
  if [ $have_cudnn -eq 1 ]; then
    # cuDNN's kernels by the names its SDPA engines use (their names are cuDNN's, not ours).
    profile attention_cudnn 4 'sdpa|fmha|flash|attn|attention|cudnn' \
      "$build/bench/bench_attention" "${att_args[@]}" --flash cudnn
  else
    skip "profile attention_cudnn" "no libcudnn.so.9 on this machine"
  fi
  profile attention_torch 6 'flash|fmha|sdpa|attention' python3 "$repo/bench/torch_attention.py" \
    --sizes 8192 --heads 32 --kv-heads 8 --head-dim 128 --repeats 1
fi

write_results

# ---- compute-sanitizer ---------------------------------------------------------------------------
# The CUDA emulation runs our kernels' threads one at a time, so it cannot prove the absence of
# shared-memory races, and it checks reads out of bounds only in a sanitizer build. On the GPU,
# compute-sanitizer does: memcheck (out-of-bounds and misaligned accesses, global and shared),
# racecheck (shared-memory hazards between threads), synccheck (barriers used where not every
# thread reaches them), on the flash tests of both versions (their reference kernels included);
# memcheck also on every op of the backend. (Global accesses are checked against the device
# allocations, which the caching allocator rounds to 512 B: an overrun inside that rounding is not
# seen.)
sanitize_steps=("sanitize memcheck flash" "sanitize racecheck flash" "sanitize synccheck flash"
  "sanitize memcheck backend")
san_bin=$(find_tool compute-sanitizer)
flash_filter='CudaFlash.ForwardMatchesReference/*:CudaFlash.BackwardMatchesReference/*'
why=$(why_not "$san_bin" compute-sanitizer)
if ! want sanitize; then
  :
elif [ -n "$why" ]; then
  for s in "${sanitize_steps[@]}"; do skip "$s" "$why"; done
else
  echo "compute-sanitizer: $san_bin ($("$san_bin" --version 2>/dev/null | tail -1))" >>"$env_txt"
  for tool in memcheck racecheck synccheck; do
    step "sanitize $tool flash" 120 "${test_env[@]}" OMP_NUM_THREADS=8 "$san_bin" --tool "$tool" \
      --error-exitcode 9 --print-limit 20 "$build/tests/cuda_attention_test" --gtest_filter="$flash_filter"
  done
  step "sanitize memcheck backend" 120 "${test_env[@]}" OMP_NUM_THREADS=8 "$san_bin" --tool memcheck \
    --error-exitcode 9 --print-limit 20 "$build/tests/cuda_backend_test"
fi

# ---- the end --------------------------------------------------------------------------------------
trap - TERM INT
write_results --print
rm -rf "$results" "$work"
# What comes back: at most 8 files, each at most 16 MiB, named in letters, digits, '.', '_', '-'.
n_files=0
for f in "$out"/*; do
  [ -e "$f" ] || continue
  n_files=$((n_files + 1))
  if [ ! -f "$f" ] || [ "$(stat -c %s "$f")" -gt $((16 * 1024 * 1024)) ] ||
    [[ $(basename "$f") =~ [^A-Za-z0-9._-] ]]; then
    echo "gpu_check: $f would not come back from the device (a folder, over 16 MiB, or an odd name)" >&2
    failed=1
  fi
done
if [ $n_files -gt 8 ]; then
  echo "gpu_check: $out holds $n_files files; the device tool brings back 8" >&2
  failed=1
fi
log "report: $out/report.md ($(ls "$out" | tr '\n' ' '))"
exit $failed
