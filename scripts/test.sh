#!/usr/bin/env bash
# The test command (CI runs it through .ci/run), in stages; docs/testing.md says what each runs:
#   build     set-up (apt) and the Release build of everything (scripts/setup.sh); where nvcc
#             is installed this is the CUDA build (-DTSP_WITH_CUDA=ON: the CUDA backend, NCCL
#             communicator and GPU tests compile and link, no GPU needed)
#   tests     the ctest suite in ${TSP_BUILD_DIR:-build}: unit, multi-rank (mpiexec at 1, 2, 4
#             and 8 ranks), shell, fuzz-corpus replays and the Hugging Face round trip; the GPU
#             tests (label cuda) report Skipped with their reason when there is no GPU
#   sanitize  AddressSanitizer + UndefinedBehaviorSanitizer build of the library, the CLI, the
#             probes and fuzz replays, with the tests (build-asan), then the tests labelled
#             sanitize under it (each multi-rank test once, at 2 ranks; tests/CMakeLists.txt)
#   fuzz      the libFuzzer targets (build-fuzz, clang), each for TSP_FUZZ_SECONDS (default 30)
# Prints each stage's time and result, and exits non-zero when any stage failed (a failing stage
# does not stop the later ones, so one run reports everything; a failed build does).
# For a quicker local run: TSP_TEST_SKIP=sanitize,fuzz scripts/test.sh (CI skips nothing).
# Extra arguments go to both ctest runs, e.g. scripts/test.sh -R safetensors.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

build="${TSP_BUILD_DIR:-build}"
asan_build="${TSP_ASAN_BUILD_DIR:-build-asan}"
fuzz_build="${TSP_FUZZ_BUILD_DIR:-build-fuzz}"
fuzz_seconds="${TSP_FUZZ_SECONDS:-30}"
fuzz_cxx="${TSP_FUZZ_CXX:-clang++-14}"
skip=",${TSP_TEST_SKIP:-},"
ctest_args=("$@")
summary=()
fuzz_notes=()
cuda_notes=()
failed=0

# run_stage GROUP NAME COMMAND...: runs COMMAND unless GROUP is in TSP_TEST_SKIP, and records
# its time and result for the summary (stage_rc holds the result; a skipped stage counts as 0).
run_stage() {
  local group=$1 name=$2
  shift 2
  stage_rc=0
  if [[ $skip == *",$group,"* ]]; then
    summary+=("$(printf '%-16s %7s  skipped (TSP_TEST_SKIP)' "$name" "")")
    return 0
  fi
  echo "== $name"
  local t0=$SECONDS
  "$@"
  stage_rc=$?
  local dt=$((SECONDS - t0))
  summary+=("$(printf '%-16s %4dm%02ds  %s' "$name" $((dt / 60)) $((dt % 60)) \
    "$([ $stage_rc -eq 0 ] && echo ok || echo "FAILED (exit $stage_rc)")")")
  [ $stage_rc -eq 0 ] || failed=1
}

print_summary() {
  echo "== summary"
  printf '  %s\n' "${summary[@]}" "${cuda_notes[@]}" "${fuzz_notes[@]}"
  [ $failed -eq 0 ] && echo "all stages passed" || echo "FAILED: see the stages above"
}

# The Hugging Face round-trip test's Python environment (apt's python3-torch, pinned transformers
# from PyPI) is made here, in the build stage, so a fresh machine's installation shows there
# instead of running inside a test's time limit; the sanitizer build's tests use the same one
# (TSP_HF_VENV, inherited by the tests through ctest).
export TSP_HF_VENV="${TSP_HF_VENV:-$(realpath -m "$build")/hf-venv}"
# With nvcc installed the build must include the CUDA backend (ON, not AUTO: a toolkit that
# CMake cannot use fails the build instead of quietly leaving the CUDA code uncompiled).
cuda_args=""
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  cuda_args="-DTSP_WITH_CUDA=ON"
fi
build_all() {
  TSP_CMAKE_ARGS="$cuda_args ${TSP_CMAKE_ARGS:-}" scripts/setup.sh &&
    scripts/hf_env.sh "$build" >/dev/null
}

run_tests() {
  ctest --test-dir "$build" --output-on-failure -j 2 --timeout 600 "${ctest_args[@]}"
  local rc=$?
  cuda_summary
  return $rc
}

# One summary line for the GPU tests: built or not, how many ctest entries skipped and why
# (each prints "[tsp-cuda-test] SKIPPED <n> of <m> tests: <reason>", tests/cuda_test_listener.cpp).
cuda_summary() {
  if ! grep -q '^TSP_CUDA_ENABLED:INTERNAL=ON' "$build/CMakeCache.txt" 2>/dev/null; then
    cuda_notes+=("$(printf '  %-16s not built (no CUDA toolkit: nvcc, cuBLASLt, NCCL)' 'cuda tests')")
    return
  fi
  local total log="$build/Testing/Temporary/LastTest.log" skipped reason
  # The log of the run just made first: ctest -N starts a new one.
  skipped=$(grep -c '\[tsp-cuda-test\] SKIPPED' "$log" 2>/dev/null)
  reason=$(grep -m1 -o '\[tsp-cuda-test\] SKIPPED.*' "$log" 2>/dev/null |
    sed -E 's/^\[tsp-cuda-test\] SKIPPED:? ([0-9]+ of [0-9]+ tests: )?//')
  total=$(ctest --test-dir "$build" -N -L cuda "${ctest_args[@]}" | sed -n 's/^Total Tests: //p')
  cuda_notes+=("$(printf '  %-16s %s ctest entries built (CUDA build), %s skipped: %s' 'cuda tests' \
    "${total:-0}" "${skipped:-0}" "${reason:-none}")")
}

build_sanitized() {
  TSP_BUILD_DIR="$asan_build" \
    TSP_CMAKE_ARGS="-DTSP_SANITIZE=address,undefined -DTSP_BUILD_BENCH=OFF -DTSP_WITH_CUDA=OFF" \
    scripts/setup.sh &&
    scripts/hf_env.sh "$asan_build" >/dev/null
}

# The tests labelled sanitize: every unit, shell and fuzz-replay test and each multi-rank test at
# 2 ranks, less four that repeat the others' code many times (tests/CMakeLists.txt says which and
# why), to fit the CI budget (docs/testing.md, "Time budget"); the tests stage runs them all.
# Each instrumented process writes its report, if any, to $asan_build/sanitizer-reports (see
# tests/CMakeLists.txt): any report fails the stage, even from a process whose test expected it
# to fail.
run_sanitized_tests() {
  local reports="$asan_build/sanitizer-reports" rc f
  rm -rf "$reports" && mkdir -p "$reports" || return
  ctest --test-dir "$asan_build" --output-on-failure -j 2 --timeout 900 -L sanitize "${ctest_args[@]}"
  rc=$?
  if compgen -G "$reports/*" >/dev/null; then
    echo "sanitizer reports from $(ls "$reports" | wc -l) processes (in $reports):"
    for f in "$reports"/*; do
      echo "--- $f"
      head -n 80 "$f"
    done
    rc=1
  fi
  return $rc
}

build_fuzzers() {
  local launcher=()
  command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  cmake -S tests/fuzz -B "$fuzz_build" -DCMAKE_CXX_COMPILER="$fuzz_cxx" "${launcher[@]}" \
    >/dev/null || return
  cmake --build "$fuzz_build" -j "$(env -u OMP_NUM_THREADS nproc)" 2>&1 | grep -vE '^\[ *[0-9]+%\]'
  return "${PIPESTATUS[0]}"
}

# Each target starts from its seed corpus (tests/fuzz/corpus/<target>, read-only) plus what
# earlier local runs found ($fuzz_build/corpus/<target>); a crash, sanitizer report, leak,
# timeout or out-of-memory is saved under $fuzz_build/artifacts and fails the stage. libFuzzer
# runs on one core, so the targets run side by side, as many at a time as there are cores (each
# still gets TSP_FUZZ_SECONDS of a core to itself); their results are reported in order.
run_fuzzers() {
  local rc=0 src t log cores
  cores=$(env -u OMP_NUM_THREADS nproc)
  mkdir -p "$fuzz_build/artifacts" "$fuzz_build/logs"
  local targets=() pids=() status=() waited=0
  for src in tests/fuzz/*_fuzz.cpp; do
    t=$(basename "$src" .cpp)
    mkdir -p "$fuzz_build/corpus/$t" || return
    local dict=()
    [ -f "tests/fuzz/$t.dict" ] && dict=(-dict="tests/fuzz/$t.dict")
    # At most `cores` running: wait for the oldest before starting another.
    if [ $((${#pids[@]} - waited)) -ge "$cores" ]; then
      wait "${pids[$waited]}"
      status[$waited]=$?
      waited=$((waited + 1))
    fi
    "$fuzz_build/$t" -max_total_time="$fuzz_seconds" -timeout=10 "${dict[@]}" \
      -artifact_prefix="$fuzz_build/artifacts/$t-" -print_final_stats=1 \
      "$fuzz_build/corpus/$t" "tests/fuzz/corpus/$t" >"$fuzz_build/logs/$t.log" 2>&1 &
    targets+=("$t")
    pids+=($!)
  done
  local i
  for i in "${!targets[@]}"; do
    if [ "$i" -ge "$waited" ]; then
      wait "${pids[$i]}"
      status[$i]=$?
    fi
    t=${targets[$i]}
    log="$fuzz_build/logs/$t.log"
    if [ "${status[$i]}" -eq 0 ]; then
      local runs corpus
      runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
      corpus=$(grep -oE 'corp: [0-9]+/[0-9]+[bKM]?b?' "$log" | tail -1 | sed 's/corp: //')
      printf '  %-18s ok: %s executions in %ss, corpus %s (inputs/bytes)\n' "$t" "${runs:-?}" \
        "$fuzz_seconds" "${corpus:-?}"
      fuzz_notes+=("$(printf '  %-16s %s executions, corpus %s' "$t" "${runs:-?}" "${corpus:-?}")")
    else
      rc=1
      echo "  $t: FINDING (log $log):"
      grep -vE '^(#[0-9]+|INFO:)' "$log" | tail -40
      echo "  reproduce: $fuzz_build/$t $fuzz_build/artifacts/$t-*; once fixed, add the input" \
        "to tests/fuzz/corpus/$t/ (a regress_* entry of tests/fuzz/make_corpus.py) so the" \
        "replay test keeps it fixed"
      fuzz_notes+=("$(printf '  %-16s FINDING (see above)' "$t")")
    fi
  done
  return $rc
}

run_stage build "build" build_all
if [ $stage_rc -ne 0 ]; then
  print_summary
  exit 1
fi
run_stage tests "tests" run_tests
run_stage sanitize "sanitize: build" build_sanitized
[ $stage_rc -ne 0 ] || run_stage sanitize "sanitize: tests" run_sanitized_tests
run_stage fuzz "fuzz: build" build_fuzzers
[ $stage_rc -ne 0 ] || run_stage fuzz "fuzz: run" run_fuzzers
print_summary
exit $failed
