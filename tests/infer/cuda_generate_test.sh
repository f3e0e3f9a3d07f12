#!/usr/bin/env bash
# `tsp generate --device cuda`: greedy decoding on the GPU (fp32) gives the CPU's tokens, under
# single and under tp, sp and tsp at 2 ranks sharing the GPU, on a checkpoint trained 40 steps on
# the CPU (a trained model has clear argmax margins; both devices compute the same fp32 function
# in another summation order, ~1e-6 relative on the logits). bf16 on the GPU runs and decodes
# the same number of tokens. Without a CUDA device it prints "[tsp-cuda-test] SKIPPED: no CUDA
# device" and succeeds (ctest reports it skipped: tests/CMakeLists.txt).
# Usage: bash cuda_generate_test.sh <build-dir> <source-dir>
source "$(dirname "$0")/../shell_common.sh"
cd "$tmp"

skip_without_cuda_device

for i in $(seq 1 400); do
  echo "verse $i: and the earth was without form, and void; and darkness was upon the deep."
done > corpus.txt
"$tsp" init --preset tiny --set num_key_value_heads=4 --seed 3 --out init > /dev/null
mpiexec -n 1 "$tsp" train --model init --data corpus.txt --layout single --batch 4 --seq 64 \
  --steps 40 --lr 3e-3 --warmup 2 --val-every 0 --progress lines --dtype fp32 --device cpu \
  --save ck > /dev/null
[ -f ck/model.safetensors ] || fail "training wrote no checkpoint"

prompt="verse 12: and the earth"
gen() {  # ranks layout out-file extra-args...
  local n=$1 layout=$2 out=$3
  shift 3
  mpiexec -n "$n" "$tsp" generate --model ck --layout "$layout" --prompt "$prompt" --max-new 24 \
    --temperature 0 --out "$out" "$@" > "$out.txt" 2> "$out.err" ||
    { cat "$out.err"; fail "generate $layout on $n ranks $* failed"; }
}
gen 1 single cpu.bin --device cpu --dtype fp32
for run in "single 1" "tp 2" "sp 2" "tsp 2"; do
  set -- $run
  gen "$2" "$1" "gpu_$1_$2.bin" --device cuda --dtype fp32
  cmp -s cpu.bin "gpu_$1_$2.bin" ||
    fail "greedy $1 D=$2 on cuda differs from the CPU:
  cpu:  $(cat cpu.bin.txt)
  cuda: $(cat gpu_$1_$2.bin.txt)"
  echo "ok: greedy $1 D=$2 on cuda = cpu"
done
echo "tokens: $(cat cpu.bin.txt)"
# bf16 on the GPU: runs, decodes as many tokens (its argmax may differ where bf16 rounds).
gen 1 single gpu_bf16.bin --device cuda --dtype bf16
[ "$(stat -c %s gpu_bf16.bin)" -eq "$(stat -c %s cpu.bin)" ] ||
  fail "bf16 on cuda wrote $(stat -c %s gpu_bf16.bin) bytes of tokens, fp32 on cpu $(stat -c %s cpu.bin)"
echo "cuda_generate_test: OK"
