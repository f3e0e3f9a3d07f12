#!/usr/bin/env bash
# Model weights through the command line. A model directory split into safetensors shards with
# model.safetensors.index.json (as transformers saves large models) gives the same bits as the
# single file in grad (1 rank, and 2 ranks under tsp), generate, train and bench; a broken index
# is an error naming the file. NaN/Inf in loaded weights stops grad and generate with the file,
# tensor and element. A full disk fails a save with a clear error and leaves the previous file.
# Usage: bash weights_cli_test.sh <build-dir> <source-dir>
source "$(dirname "$0")/../shell_common.sh"
py=/usr/bin/python3
check="$src/scripts/check_safetensors.py"
"$py" -c 'import numpy' 2>/dev/null || fail "numpy is not importable by $py; run scripts/setup.sh"

expect_fail() {  # message fragment, command...
  local want=$1
  shift
  if "$@" >"$tmp/out" 2>&1; then fail "expected an error from: $*"; fi
  grep -qF -- "$want" "$tmp/out" || { cat "$tmp/out" >&2; fail "the error of '$*' lacks: $want"; }
}
sums() { "$tsp" inspect --checksums "$1" | grep '^checksum'; }

"$tsp" init --preset tiny --seed 3 --out "$tmp/single" >/dev/null
for i in $(seq 1 30); do echo "line $i: the quick brown fox jumps over the lazy dog"; done |
  "$tsp" encode --stdin --out "$tmp/tokens.bin" >/dev/null
cp -r "$tmp/single" "$tmp/sharded"
"$py" "$check" --shard "$tmp/sharded" --shards 3 >/dev/null
[ ! -e "$tmp/sharded/model.safetensors" ] || fail "sharding left model.safetensors"

echo "== sharded = single: grad (1 and 2 ranks), generate, train, bench"
for m in single sharded; do
  "$tsp" grad --model "$tmp/$m" --tokens "$tmp/tokens.bin" --batch 2 --seq 32 \
    --out "$tmp/g_$m.safetensors" >/dev/null
  mpiexec -n 2 "$tsp" grad --model "$tmp/$m" --tokens "$tmp/tokens.bin" --batch 2 --seq 32 \
    --layout tsp --out "$tmp/g2_$m.safetensors" >/dev/null
  "$tsp" generate --model "$tmp/$m" --prompt "the quick" --max-new 24 --temperature 0 --quiet \
    --out "$tmp/gen_$m.bin" >/dev/null 2>&1 || fail "generate --model $tmp/$m failed"
done
[ "$(sums "$tmp/g_single.safetensors")" == "$(sums "$tmp/g_sharded.safetensors")" ] ||
  fail "grad differs between the single file and the shards"
# Shards as symbolic links into a blob store, as in the Hugging Face cache.
mkdir "$tmp/blobs" "$tmp/linked"
cp "$tmp/sharded"/*.json "$tmp/linked/"
for f in "$tmp/sharded"/model-*.safetensors; do
  cp "$f" "$tmp/blobs/$(basename "$f").blob"
  ln -s "../blobs/$(basename "$f").blob" "$tmp/linked/$(basename "$f")"
done
"$tsp" grad --model "$tmp/linked" --tokens "$tmp/tokens.bin" --batch 2 --seq 32 \
  --out "$tmp/g_linked.safetensors" >/dev/null
[ "$(sums "$tmp/g_single.safetensors")" == "$(sums "$tmp/g_linked.safetensors")" ] ||
  fail "grad differs on symlinked shards"
[ "$(sums "$tmp/g2_single.safetensors")" == "$(sums "$tmp/g2_sharded.safetensors")" ] ||
  fail "grad at 2 ranks (tsp) differs between the single file and the shards"
cmp -s "$tmp/gen_single.bin" "$tmp/gen_sharded.bin" || fail "generate differs on the shards"
"$tsp" train --model "$tmp/sharded" --data "$tmp/tokens.bin" --steps 2 --batch 2 --seq 32 \
  --val-every 0 --save "$tmp/trained" >/dev/null || fail "train --model on shards failed"
[ -f "$tmp/trained/model.safetensors" ] || fail "train did not save"
"$tsp" bench --model "$tmp/sharded" --layouts single --seq 32 --batch 1 --repeats 1 >/dev/null ||
  fail "bench --model on shards failed"

echo "== a broken index is an error naming the file"
cp -r "$tmp/sharded" "$tmp/lost"
rm "$tmp/lost/model-00002-of-00003.safetensors"
expect_fail "to model-00002-of-00003.safetensors, which is missing from $tmp/lost" \
  "$tsp" grad --model "$tmp/lost" --tokens "$tmp/tokens.bin" --batch 2 --seq 32 --out "$tmp/x"
expect_fail "model-00002-of-00003.safetensors, which is missing" \
  "$tsp" generate --model "$tmp/lost" --prompt "a" --max-new 2

echo "== NaN/Inf in loaded weights"
q=model.layers.1.self_attn.q_proj.weight  # [64, 64]: element 209 is [3, 17]
cp -r "$tmp/single" "$tmp/nan"
"$py" "$check" "$tmp/nan/model.safetensors" --poison "$q:209:nan"
want="$tmp/nan/model.safetensors: tensor \"$q\" holds 1 non-finite value (NaN or Inf)"
expect_fail "$want" \
  "$tsp" grad --model "$tmp/nan" --tokens "$tmp/tokens.bin" --batch 2 --seq 32 --out "$tmp/x"
grep -qF "the first is nan at element 209 [3, 17]" "$tmp/out" || fail "no element in: $(cat "$tmp/out")"
expect_fail "$want" "$tsp" generate --model "$tmp/nan" --prompt "a" --max-new 2
expect_fail "holds 1 non-finite value" mpiexec -n 2 "$tsp" grad --model "$tmp/nan" \
  --tokens "$tmp/tokens.bin" --batch 2 --seq 32 --layout tsp --out "$tmp/x"
[ ! -e "$tmp/x" ] || fail "grad wrote an output from NaN weights"
cp -r "$tmp/sharded" "$tmp/inf"
"$py" "$check" "$tmp/inf/model-00003-of-00003.safetensors" --poison "model.norm.weight:5:-inf"
expect_fail "model-00003-of-00003.safetensors: tensor \"model.norm.weight\" holds 1 non-finite" \
  "$tsp" grad --model "$tmp/inf" --tokens "$tmp/tokens.bin" --batch 2 --seq 32 --out "$tmp/x"
expect_fail "holds 1 non-finite value" \
  "$tsp" train --model "$tmp/inf" --data "$tmp/tokens.bin" --steps 1 --batch 2 --seq 32

echo "== a full disk fails the save and keeps the previous file"
# A file-size limit (SIGXFSZ ignored, so writes fail with EFBIG) stands for a full disk; init
# runs without MPI, whose start-up needs to write more than the limit.
before=$(sums "$tmp/single/model.safetensors")
expect_fail "cannot write $tmp/single/model.safetensors: File too large" \
  bash -c "ulimit -f 64; trap '' XFSZ; exec '$tsp' init --preset tiny --seed 9 --out '$tmp/single'"
[ "$(sums "$tmp/single/model.safetensors")" == "$before" ] || fail "the previous model changed"
[ -z "$(find "$tmp/single" -name '*.tmp.*')" ] || fail "a temporary file was left behind"
# A device is never replaced by a renamed file.
expect_fail "/dev/full" \
  "$tsp" grad --model "$tmp/single" --tokens "$tmp/tokens.bin" --batch 2 --seq 32 --out /dev/full
[ -c /dev/full ] || fail "/dev/full is no longer a character device"
# A real full filesystem, where this machine lets us mount one (root with CAP_SYS_ADMIN).
mkdir "$tmp/full"
if mount -t tmpfs -o size=768k tmpfs "$tmp/full" 2>/dev/null; then
  trap 'umount "$tmp/full" 2>/dev/null || true; rm -rf "$tmp"' EXIT
  "$tsp" grad --model "$tmp/single" --tokens "$tmp/tokens.bin" --batch 2 --seq 32 \
    --out "$tmp/full/g.safetensors" >/dev/null
  good=$(sums "$tmp/full/g.safetensors")
  dd if=/dev/zero of="$tmp/full/filler" bs=4k status=none 2>/dev/null || true  # fill it up
  expect_fail "No space left on device" "$tsp" grad --model "$tmp/sharded" \
    --tokens "$tmp/tokens.bin" --batch 2 --seq 16 --out "$tmp/full/g.safetensors"
  [ "$(sums "$tmp/full/g.safetensors")" == "$good" ] || fail "the previous gradient file changed"
  [ -z "$(find "$tmp/full" -name '*.tmp.*')" ] || fail "a temporary file was left behind"
  umount "$tmp/full"
else
  echo "(cannot mount a tmpfs here: the full-filesystem case is covered by io_test's CheckedWrites)"
fi
echo PASS
