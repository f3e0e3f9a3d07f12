#!/usr/bin/env bash
# Interoperability of our safetensors files with an independent reader: `tsp init` writes a model,
# scripts/check_safetensors.py (numpy only) parses it from the specification, agrees with
# `tsp inspect --checksums` on every tensor and re-derives every value of init_param bit for bit;
# then the Python side writes a file (HF ordering, F16, metadata) that tsp must read identically.
# Usage: bash safetensors_python_test.sh <build-dir> <source-dir>
set -euo pipefail
build="$1"
src="$2"
py=/usr/bin/python3
# A missing interpreter or numpy is a failure, not a skip: scripts/setup.sh installs both, and a
# skipped interoperability test would hide a broken format.
if [ ! -x "$py" ]; then
  echo "FAIL: $py not found; run scripts/setup.sh (installs python3-numpy)" >&2
  exit 1
fi
if ! "$py" -c "import numpy" 2>/dev/null; then
  echo "FAIL: numpy is not importable by $py; run scripts/setup.sh (installs python3-numpy)" >&2
  exit 1
fi
tsp="$build/tsp"
[ -x "$tsp" ] || { echo "FAIL: $tsp not built" >&2; exit 1; }
check="$src/scripts/check_safetensors.py"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

for dtype in float32 bfloat16; do
  echo "== tsp init (tiny, 3 layers, tied=false, $dtype) -> python"
  "$tsp" init --preset tiny --set num_hidden_layers=3 --seed 11 --dtype "$dtype" --out "$tmp/m_$dtype"
  "$tsp" inspect --checksums "$tmp/m_$dtype/model.safetensors" > "$tmp/tsp_$dtype.txt"
  "$py" "$check" "$tmp/m_$dtype/model.safetensors" --compare "$tmp/tsp_$dtype.txt" \
    --init-seed 11 --config "$tmp/m_$dtype/config.json" | tail -n 2
done

echo "== tied embeddings: no lm_head.weight"
"$tsp" init --preset tiny --set tie_word_embeddings=true --seed 2 --out "$tmp/tied"
"$tsp" inspect --checksums "$tmp/tied/model.safetensors" > "$tmp/tsp_tied.txt"
"$py" "$check" "$tmp/tied/model.safetensors" --compare "$tmp/tsp_tied.txt" --init-seed 2 \
  --config "$tmp/tied/config.json" | tail -n 1
if grep -q lm_head "$tmp/tsp_tied.txt"; then
  echo "FAIL: a tied model must not store lm_head.weight" >&2
  exit 1
fi

echo "== python writes, tsp reads"
"$py" "$check" --write-sample "$tmp/py.safetensors" > /dev/null
"$tsp" inspect --checksums "$tmp/py.safetensors" > "$tmp/tsp_py.txt"
"$py" "$check" "$tmp/py.safetensors" --compare "$tmp/tsp_py.txt" | tail -n 1
[ "$(grep -c '^checksum' "$tmp/tsp_py.txt")" -eq 6 ] || { echo "FAIL: expected 6 tensors" >&2; exit 1; }

# The checker itself must be able to fail: a value flipped in the file is caught.
cp "$tmp/m_float32/model.safetensors" "$tmp/flipped.safetensors"
size=$(stat -c %s "$tmp/flipped.safetensors")
printf '\x7f' | dd of="$tmp/flipped.safetensors" bs=1 seek=$((size - 3)) conv=notrunc status=none
if "$py" "$check" "$tmp/flipped.safetensors" --init-seed 11 --config "$tmp/m_float32/config.json" \
    > /dev/null 2>&1; then
  echo "FAIL: check_safetensors.py accepted a corrupted value" >&2
  exit 1
fi
if "$py" "$check" "$tmp/flipped.safetensors" --compare "$tmp/tsp_float32.txt" > /dev/null 2>&1; then
  echo "FAIL: the checksum comparison accepted a corrupted value" >&2
  exit 1
fi
echo "PASS"
