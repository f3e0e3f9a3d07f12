#!/usr/bin/env bash
# A real Hugging Face round trip: random LlamaForCausalLM models made and saved by transformers
# (MHA, GQA, tied embeddings, and one split over several safetensors files with
# model.safetensors.index.json) load in tsp, and a checkpoint tsp trained loads in transformers;
# on the same tokens, tsp's loss and every gradient (`tsp grad`, 1 rank and `mpiexec -n 2
# --layout tsp`) equal transformers' loss and PyTorch autograd's gradients within the fp32
# tolerance derived in tests/model/hf_roundtrip.py (errors measured against fp64). A model with a
# wrong config (negative control) must miss the tolerance. The Python environment (Debian's torch,
# transformers from PyPI, pinned) is made by scripts/hf_env.sh in <build-dir>/hf-venv on the first
# run and reused; if it cannot be made the test fails, saying why.
# Usage: bash hf_roundtrip_test.sh <build-dir> <source-dir>
source "$(dirname "$0")/../shell_common.sh"

py=$("$src/scripts/hf_env.sh" "$build") || fail "cannot make the Python environment (scripts/hf_env.sh, see above)"
rt="$src/tests/model/hf_roundtrip.py"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1

"$py" "$rt" make "$tmp"
shards=$(find "$tmp/sharded" -name 'model-*-of-*.safetensors' | wc -l)
[ -f "$tmp/sharded/model.safetensors.index.json" ] && [ "$shards" -ge 3 ] &&
  [ ! -e "$tmp/sharded/model.safetensors" ] ||
  fail "transformers did not shard the model (found $shards shard files)"

grad() {  # ranks, model dir, output, extra args...
  local n=$1 model=$2 out=$3; shift 3
  mpiexec -n "$n" "$tsp" grad --dtype fp32 --model "$model" --tokens "$tmp/tokens.bin" --batch 2 --seq 32 \
    --out "$out" "$@" >/dev/null || fail "tsp grad on $model failed"
}
for c in mha gqa tied sharded; do grad 1 "$tmp/$c" "$tmp/g_$c.safetensors"; done
grad 2 "$tmp/sharded" "$tmp/g_sharded_tsp2.safetensors" --layout tsp

# tsp trains the tied model at 2 ranks (tsp layout) and saves a checkpoint for transformers.
mpiexec -n 2 "$tsp" train --model "$tmp/tied" --data "$tmp/tokens.bin" --layout tsp --steps 3 \
  --batch 2 --seq 32 --lr 1e-3 --warmup 0 --val-every 0 --save "$tmp/trained" >/dev/null ||
  fail "tsp train failed"
grad 1 "$tmp/trained" "$tmp/g_trained.safetensors"

# Negative control: tsp reads the GQA model with rms_norm_eps 1e-6 instead of 1e-5 (a one-field
# slip); transformers keeps the right config. The check must report a mismatch for it.
cp -r "$tmp/gqa" "$tmp/wrong_eps"
sed -i 's/"rms_norm_eps": 1e-05/"rms_norm_eps": 1e-06/' "$tmp/wrong_eps/config.json"
grep -q '"rms_norm_eps": 1e-06' "$tmp/wrong_eps/config.json" || fail "could not edit rms_norm_eps"
grad 1 "$tmp/wrong_eps" "$tmp/g_wrong_eps.safetensors"

# The trained weights differ from the initial ones (else "trained" would test nothing new).
if cmp -s "$tmp/g_tied.safetensors" "$tmp/g_trained.safetensors"; then
  fail "training did not change the model"
fi

"$py" "$rt" check "$tmp" \
  mha:"$tmp/mha":"$tmp/g_mha.safetensors" \
  gqa:"$tmp/gqa":"$tmp/g_gqa.safetensors" \
  tied:"$tmp/tied":"$tmp/g_tied.safetensors" \
  sharded:"$tmp/sharded":"$tmp/g_sharded.safetensors" \
  sharded-tsp2:"$tmp/sharded":"$tmp/g_sharded_tsp2.safetensors" \
  trained:"$tmp/trained":"$tmp/g_trained.safetensors" \
  wrong-eps:"$tmp/gqa":"$tmp/g_wrong_eps.safetensors":mismatch ||
  fail "the Hugging Face check failed (above)"
echo PASS
