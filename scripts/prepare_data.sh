#!/usr/bin/env bash
# Prepares the demo corpus: the King James Bible (Debian's bible-kjv package) as plain text,
# data/kjv.txt (about 4.4 MB; trained on with the byte-level tokenizer, ids 0-255).
# Idempotent: an existing complete file is kept. scripts/setup.sh installs bible-kjv.
#
# --chapters [OUT]: the same text packed as documents, one per chapter (default
# data/kjv_chapters.txt): a form feed (byte 12) ends every chapter but the last, so training with
# --doc-sep 12 keeps attention inside a chapter and restarts positions with each
# (docs/layouts.md, "Documents").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--chapters" ]; then
  out="${2:-data/kjv_chapters.txt}"
  if [ -s "$out" ]; then
    exit 0
  fi
  "$0" data/kjv.txt
  tmp="$out.tmp.$$"
  trap 'rm -f "$tmp"' EXIT
  # Lines are verses "Ge1:1 In the beginning ..."; the chapter is the reference before ':'.
  awk '{ split($1, ref, ":"); if (NR > 1 && ref[1] != chapter) printf "\f"; chapter = ref[1]; print }' \
    data/kjv.txt > "$tmp"
  mv "$tmp" "$out"
  trap - EXIT
  echo "prepare_data: wrote $out ($(tr -cd '\f' < "$out" | wc -c) chapter separators, byte 12)"
  exit 0
fi
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
