#!/usr/bin/env bash
# An error on one rank aborts the whole job with that rank's message, never a hang.
# Runs tests/comm/abort_probe.cpp under mpiexec: one rank throws while the others wait in an
# all_reduce; the job must exit non-zero well within the timeout and stderr must carry
# "error: [rank R] <message>" from the thrower. The "ok" mode is the control: exit 0.
# Usage: bash abort_test.sh <build-dir> <source-dir>
set -uo pipefail
build=${1:?build dir}
src=${2:?source dir}
source "$src/scripts/env.sh"
probe="$build/tests/abort_probe"
[[ -x $probe ]] || { echo "FAIL: $probe not built (cmake --build $build --target abort_probe)"; exit 1; }

failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
log=$(mktemp)
trap 'rm -f "$log"' EXIT

run() {  # run <np> <args...>; sets rc and elapsed seconds
  local start=$SECONDS
  timeout 60 mpiexec -n "$1" "$probe" "${@:2}" >"$log" 2>&1
  rc=$?
  elapsed=$((SECONDS - start))
}

for np in 1 2 4; do
  run "$np" ok
  [[ $rc -eq 0 ]] || { fail "np=$np ok: exit $rc"; cat "$log"; }
  grep -q "probe ok: sum $np" "$log" || fail "np=$np ok: no success line"

  for mode in error std pending; do
    thrower=$((np - 1))
    run "$np" "$mode" "$thrower"
    if [[ $rc -eq 124 ]]; then
      fail "np=$np $mode: job hung (killed by timeout after ${elapsed}s)"
    elif [[ $rc -eq 0 ]]; then
      fail "np=$np $mode: exit 0 although rank $thrower failed"
    fi
    case $mode in
      std) want="error: [rank $thrower] probe std failure on purpose" ;;
      *) want="error: [rank $thrower] probe failure on purpose (mode $mode)" ;;
    esac
    grep -qF "$want" "$log" || { fail "np=$np $mode: stderr lacks '$want'"; cat "$log"; }
    # Printed once, by the thrower only.
    n=$(grep -c "^error: " "$log")
    [[ $n -eq 1 ]] || { fail "np=$np $mode: $n 'error:' lines, want 1"; cat "$log"; }
    echo "np=$np $mode: exit $rc after ${elapsed}s"
  done
done

# The thrower is rank 0 as well (the rank that usually prints).
run 4 error 0
grep -qF "error: [rank 0] probe failure on purpose" "$log" || fail "np=4 thrower 0: message"
[[ $rc -ne 0 && $rc -ne 124 ]] || fail "np=4 thrower 0: exit $rc"

if [[ $failures -gt 0 ]]; then
  echo "$failures failure(s)"
  exit 1
fi
echo "abort_test: all passed"
