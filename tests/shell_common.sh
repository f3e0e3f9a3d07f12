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
