#!/usr/bin/env bash
# Prepares the demo corpus: the King James Bible (Debian's bible-kjv package) as plain text,
# data/kjv.txt (about 4.4 MB; trained on with the byte-level tokenizer, ids 0-255).
# Idempotent: an existing complete file is kept. scripts/setup.sh installs bible-kjv.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-data/kjv.txt}"
if [ -s "$out" ]; then
  exit 0
fi
if ! command -v bible >/dev/null 2>&1; then
  echo "prepare_data: the 'bible' command is missing; install Debian's bible-kjv package" \
    "(scripts/setup.sh does, or: apt-get install bible-kjv)" >&2
  exit 1
fi
mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
bible -f Gen1:1-Rev22:21 > "$tmp"
size=$(stat -c %s "$tmp")
if [ "$size" -lt 4000000 ]; then
  echo "prepare_data: bible printed only $size bytes (expected about 4.4 MB); is bible-kjv complete?" >&2
  exit 1
fi
mv "$tmp" "$out"
trap - EXIT
echo "prepare_data: wrote $out ($size bytes)"
