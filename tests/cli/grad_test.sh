#!/usr/bin/env bash
# `tsp grad` end to end: a random tiny model (tsp init) and a byte-level token file (tsp encode);
# the gradient file of single at 1 rank against single at 2 ranks with --dp 2 (tsp compare), a
# repeat run bit for bit, a different model that compare must reject, and the input errors.
# Usage: bash grad_test.sh <build-dir> <source-dir>
source "$(dirname "$0")/../shell_common.sh"

"$tsp" init --preset tiny --seed 1 --out "$tmp/model" >/dev/null
"$tsp" init --preset tiny --seed 2 --out "$tmp/other" >/dev/null
for i in $(seq 1 20); do echo "line $i: the quick brown fox jumps over the lazy dog"; done |
  "$tsp" encode --stdin --out "$tmp/tokens.bin" >/dev/null

run_grad() {  # ranks, extra args...
  local n=$1; shift
  mpiexec -n "$n" "$tsp" grad --tokens "$tmp/tokens.bin" --batch 4 --seq 32 "$@"
}

run_grad 1 --model "$tmp/model" --out "$tmp/g1.safetensors"
run_grad 2 --model "$tmp/model" --dp 2 --out "$tmp/g2.safetensors"
run_grad 1 --model "$tmp/model" --out "$tmp/g1b.safetensors" >/dev/null
run_grad 1 --model "$tmp/other" --out "$tmp/gother.safetensors" >/dev/null

# dp=2 against dp=1: the same function, another summation order (two half-batch gradients
# added by the all-reduce), fp32 throughout. 1e-4 norm-wise is the layout tolerance of
# tests/parallel/layout_harness.h (kLayoutRtol), justified there.
"$tsp" compare "$tmp/g2.safetensors" "$tmp/g1.safetensors" --rtol 1e-4 > "$tmp/cmp.txt" ||
  { cat "$tmp/cmp.txt"; fail "dp=2 gradients differ from single"; }
grep -q '^  loss ' "$tmp/cmp.txt" || fail "the gradient file has no loss tensor"
grep -q 'model.layers.1.mlp.down_proj.weight' "$tmp/cmp.txt" || fail "missing a gradient"
tail -1 "$tmp/cmp.txt"
# The same run twice is bit for bit the same.
"$tsp" compare "$tmp/g1b.safetensors" "$tmp/g1.safetensors" --rtol 0 >/dev/null ||
  fail "two identical runs differ"
# compare must be able to fail: another model's gradients are far off.
if "$tsp" compare "$tmp/gother.safetensors" "$tmp/g1.safetensors" --rtol 1e-4 >/dev/null; then
  fail "compare accepted the gradients of a different model"
fi

# --recompute full replays each layer's forward in the backward and none keeps what selective
# recomputes: the same arithmetic, so the same bits as the default (selective);
# tests/parallel/recompute_mpi_test.cpp covers every layout.
run_grad 2 --model "$tmp/model" --layout tsp --out "$tmp/gsel.safetensors" >/dev/null
for mode in full none; do
  run_grad 2 --model "$tmp/model" --layout tsp --recompute $mode --out "$tmp/g$mode.safetensors" \
    > "$tmp/$mode.txt"
  grep -q "recompute $mode" "$tmp/$mode.txt" || { cat "$tmp/$mode.txt"; fail "grad does not say the mode"; }
  "$tsp" compare "$tmp/g$mode.safetensors" "$tmp/gsel.safetensors" --rtol 0 >/dev/null ||
    fail "--recompute $mode changed the gradients"
done

expect_error() {  # message-substring, command...
  local want=$1; shift
  if "$@" >"$tmp/err.txt" 2>&1; then fail "expected an error containing '$want': $*"; fi
  grep -qF -- "$want" "$tmp/err.txt" || { cat "$tmp/err.txt"; fail "error lacks '$want'"; }
}
expect_error "needs B·(S+1) = 2004" \
  mpiexec -n 1 "$tsp" grad --model "$tmp/model" --tokens "$tmp/tokens.bin" --batch 4 --seq 500 \
  --out "$tmp/x.safetensors"
expect_error "exceeds max_position_embeddings=512" \
  mpiexec -n 1 "$tsp" grad --model "$tmp/model" --tokens "$tmp/tokens.bin" --batch 1 --seq 600 \
  --out "$tmp/x.safetensors"
"$tsp" init --preset tiny --set vocab_size=64 --out "$tmp/small_vocab" >/dev/null
expect_error "is not below vocab_size=64" \
  mpiexec -n 1 "$tsp" grad --model "$tmp/small_vocab" --tokens "$tmp/tokens.bin" --batch 1 \
  --seq 16 --out "$tmp/x.safetensors"
expect_error "use --dp 2" \
  mpiexec -n 2 "$tsp" grad --model "$tmp/model" --tokens "$tmp/tokens.bin" --batch 2 --seq 16 \
  --out "$tmp/x.safetensors"
expect_error "unknown layout 'nope'" \
  mpiexec -n 1 "$tsp" grad --model "$tmp/model" --tokens "$tmp/tokens.bin" --layout nope \
  --batch 2 --seq 16 --out "$tmp/x.safetensors"
expect_error "--recompute keep is not a recomputation mode; use none, selective (the default) or full" \
  mpiexec -n 1 "$tsp" grad --model "$tmp/model" --tokens "$tmp/tokens.bin" --recompute keep \
  --batch 2 --seq 16 --out "$tmp/x.safetensors"
[ ! -e "$tmp/x.safetensors" ] || fail "a failed run left an output file"
echo "grad_test: OK"
