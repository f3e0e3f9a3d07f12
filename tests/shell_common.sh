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

