#!/usr/bin/env bash
# `tsp encode`, `tsp inspect` and `tsp init` from the command line: the token file's bytes are
# checked against the llm.c layout independently (python struct), and bad inputs must fail with
# a message, not a crash; `tsp --help` explains every environment variable the sources read.
# Usage: bash cli_io_test.sh <build-dir> <source-dir>
set -euo pipefail
build="$1"
src="$2"
tsp="$build/tsp"
[ -x "$tsp" ] || { echo "FAIL: $tsp not built" >&2; exit 1; }
py=/usr/bin/python3
[ -x "$py" ] || { echo "FAIL: $py not found; run scripts/setup.sh" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
# expect_error "<needle>" cmd...: the command must exit non-zero and print the needle on stderr.
expect_error() {
  local needle="$1"
  shift
  if "$@" > "$tmp/out" 2> "$tmp/err"; then fail "'$*' succeeded; expected an error"; fi
  grep -qF -- "$needle" "$tmp/err" || fail "'$*' printed: $(cat "$tmp/err"), expected '$needle'"
}

echo "== encode: byte-level ids in llm.c layout"
printf 'Hello, TSP!\n\xc3\xa9\x00\xff' > "$tmp/text.txt"
"$tsp" encode --text "$tmp/text.txt" --out "$tmp/t16.bin"
"$tsp" encode --stdin --uint32 --out "$tmp/t32.bin" < "$tmp/text.txt"
"$py" - "$tmp/text.txt" "$tmp/t16.bin" "$tmp/t32.bin" <<'PY'
import struct, sys
text = open(sys.argv[1], "rb").read()
for path, magic, version, fmt in ((sys.argv[2], 20240520, 1, "H"), (sys.argv[3], 20240801, 7, "I")):
    blob = open(path, "rb").read()
    header = struct.unpack("<256i", blob[:1024])
    assert header[:3] == (magic, version, len(text)), (path, header[:3])
    assert all(h == 0 for h in header[3:]), path
    ids = struct.unpack("<%d%s" % (len(text), fmt), blob[1024:])
    assert list(ids) == list(text), (path, ids)
    print(path, "ok:", len(ids), "tokens")
PY
"$tsp" inspect "$tmp/t16.bin" | tee "$tmp/i16.txt"
grep -q "uint16 ids, 16 tokens" "$tmp/i16.txt" || fail "inspect of the uint16 file"
grep -q "first ids: 72 101 108 108 111" "$tmp/i16.txt" || fail "inspect first ids"
"$tsp" inspect "$tmp/t32.bin" | grep -q "magic 20240801 version 7, uint32 ids, 16 tokens" \
  || fail "inspect of the uint32 file"

echo "== errors are messages"
head -c 1000 "$tmp/t16.bin" > "$tmp/short.bin"
expect_error "shorter than the 1024-byte header" "$tsp" inspect "$tmp/short.bin"
expect_error "not a safetensors file" "$tsp" inspect "$tmp/text.txt"
head -c 1030 "$tmp/t16.bin" > "$tmp/trunc.bin"
expect_error "announces 16 tokens" "$tsp" inspect "$tmp/trunc.bin"
expect_error "exactly one of --text FILE or --stdin" "$tsp" encode --out "$tmp/x.bin"
expect_error "unknown config key \"hidden\"" "$tsp" init --preset tiny --set hidden=3 --out "$tmp/m"
expect_error "not divisible by num_key_value_heads" \
  "$tsp" init --preset tiny --set num_key_value_heads=3 --out "$tmp/m"
expect_error "exactly one of --config FILE or --preset NAME" "$tsp" init --out "$tmp/m"
[ ! -e "$tmp/m" ] || fail "a failed init left $tmp/m behind"

echo "== init from a config.json, then inspect"
"$tsp" init --preset tiny --seed 3 --out "$tmp/a"
"$tsp" init --config "$tmp/a/config.json" --seed 3 --out "$tmp/b"
cmp "$tmp/a/model.safetensors" "$tmp/b/model.safetensors" || fail "same config and seed must give the same file"
"$tsp" init --config "$tmp/a/config.json" --seed 4 --out "$tmp/c"
if cmp -s "$tmp/a/model.safetensors" "$tmp/c/model.safetensors"; then fail "seeds 3 and 4 gave equal weights"; fi
"$tsp" inspect "$tmp/a/model.safetensors" | grep -q "21 tensors, 119104 elements" || fail "inspect model"
for cmd in init encode inspect; do
  "$tsp" "$cmd" --help | grep -q "Usage" || fail "$cmd --help"
done
# Every environment variable the tool reads (the test suite's own hooks, TSP_TEST_*, aside) is
# explained by `tsp --help`: a new one without a line there fails here.
help=$("$tsp" --help)
vars=$(grep -rhoE '(getenv|env_or_empty)\("(TSP|OMP)_[A-Z0-9_]+"\)' "$src/src" |
  grep -oE '(TSP|OMP)_[A-Z0-9_]+' | grep -v '^TSP_TEST_' | sort -u)
[ -n "$vars" ] || fail "found no environment variable read in $src/src (has the pattern changed?)"
for var in $vars; do
  grep -q "^  $var=" <<< "$help" || fail "tsp --help does not explain $var"
done
echo "PASS"
