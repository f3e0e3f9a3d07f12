# Sourced by the shell tests (tests/<area>/<name>_test.sh, run as `bash FILE <build-dir>
# <source-dir>`): strict mode, the OpenMPI settings, $build, $src, $tsp, a private $tmp removed on
# exit, and fail MESSAGE.
set -euo pipefail
build=$(cd "$1" && pwd)
src=$(cd "$2" && pwd)
source "$src/scripts/env.sh"
tsp="$build/tsp"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
# expect_failure "what" "message fragment" COMMAND...: COMMAND must exit non-zero and its output
# (stdout and stderr) must contain the fragment.
expect_failure() {
  local what=$1 fragment=$2
  shift 2
  local out
  if out=$("$@" 2>&1); then
    fail "$what: the command succeeded: $*"
  fi
  grep -qF -- "$fragment" <<< "$out" || { echo "$out" | head -20; fail "$what: no '$fragment'"; }
  echo "ok: $what"
}

# write_verses N FILE: a small text corpus of N numbered lines, varied enough (a hashed number in
# each) that training on it is not trivial; the training shell tests' data.
write_verses() {
  local i
  for i in $(seq 1 "$1"); do
    echo "verse $i: and the earth was without form, and void; and darkness $((i * 7919 % 1000))."
  done > "$2"
}
# metric FILE [FIELD]: the values of FIELD (default loss) in a metrics JSONL file (tsp train
# --metrics), one per line ("loss" does not match "val_loss").
metric() { grep -o "\"${2:-loss}\":[^,}]*" "$1" | cut -d: -f2; }
# compare_metric REF RUN LABEL TOL [FIELD] [FIRST]: |run - ref| <= TOL (absolute) for FIELD
# (default loss) at every line of RUN, against REF's lines from FIRST on (default 1: a resumed run
# starts later); prints the largest difference; fails beyond TOL, or when nothing was compared.
compare_metric() {
  local field=${5:-loss}
  paste -d' ' <(metric "$1" "$field" | tail -n +"${6:-1}") <(metric "$2" "$field") |
    awk -v label="$3" -v tol="$4" -v field="$field" '
      {d = $1 - $2; if (d < 0) d = -d; if (d > tol) bad = 1; if (d > m) m = d; n++}
      END {printf "%-34s %2d steps  max |%s - reference| %.2e\n", label, n, field, m;
           exit bad || n == 0}' ||
    fail "$3: $field differs from the reference run beyond $4"
}

# skip_without_cuda_device: a GPU shell test (tests/<area>/cuda_*_test.sh) ends here, successfully,
# with the skip line ctest looks for (tests/CMakeLists.txt), when no CUDA device is visible.
skip_without_cuda_device() {
  local probe="$build/tests/cuda_devices_probe"
  [ -x "$probe" ] || fail "$probe is missing (it is built with the tests)"
  if [ "$("$probe")" -lt 1 ]; then
    echo "[tsp-cuda-test] SKIPPED: no CUDA device"
    exit 0
  fi
}

