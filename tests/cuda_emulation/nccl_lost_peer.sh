#!/usr/bin/env bash
# A lost or stuck NCCL peer ends the job with an error, at whatever point of the run it happens; no
# rank hangs. Under CUDA emulation only (it injects the faults; tests/cuda_emulation/README.md,
# "NCCL"): TSP_EMU_NCCL_LOSE_PEER=n makes each process's n-th NCCL operation behave as real NCCL's
# does when a peer dies or the network fails: it never completes, and the communicator's
# asynchronous error becomes ncclRemoteError. TSP_EMU_NCCL_STALL_PEER=n: it never completes and
# NCCL reports nothing (a stuck peer), which only tsp's timeout (TSP_NCCL_TIMEOUT) can end.
# A sweep runs a command with n = 1, 1 + stride, … until a run passes (n beyond the run's last
# operation), so the fault lands in every phase: set-up, forward, backward, the gradients'
# gather, the optimizer, the checkpoint. Every faulted run must exit non-zero within the time
# limit and say why.
#
# Without the host's polling waits (src/backend/cuda/cuda_common.h, wait_for_stream), a lost peer
# in the backward or the gather hangs for ever: a download waits for a compute stream that waits
# for the lost transfer.
# Usage: bash nccl_lost_peer.sh <emulated-cli-dir> <source-dir>   (the dir holding the emulated tsp)
set -euo pipefail
cli=$(cd "$1" && pwd)
src=$(cd "$2" && pwd)
source "$src/scripts/env.sh"
tsp="$cli/tsp"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
cd "$tmp"

export TSP_COMM=nccl  # every emulated process has a device of its own: NCCL, as one GPU per rank
unset TSP_EMU_SHARED_DEVICE
limit=60              # seconds; a healthy run here takes 1-3

for i in $(seq 1 300); do echo "verse $i: and the earth was without form, and void"; done > corpus.txt
"$tsp" init --preset tiny --seed 1 --out init > /dev/null
"$tsp" encode --text corpus.txt --out corpus.bin > /dev/null

# sweep FAULT LABEL STRIDE ARGS...: `tsp ARGS` on 2 ranks with FAULT (lose or stall) at NCCL
# operation n = 1, 1 + STRIDE, ... until a run passes.
sweep() {
  local fault=$1 label="$2 ($1)" stride=$3 n=1 rc faulted=0 setting expect1 expect2
  shift 3
  if [ "$fault" = lose ]; then
    setting=TSP_EMU_NCCL_LOSE_PEER expect1="lost its peer"
    expect2="A transfer of this job cannot finish"
  else
    setting=TSP_EMU_NCCL_STALL_PEER expect1="has not finished, and NCCL reports no error"
    expect2="TSP_NCCL_TIMEOUT sets the limit"
  fi
  while :; do
    rc=0
    # SIGTERM first: mpiexec passes it on to the ranks, so a hung run leaves no process behind.
    env "$setting=$n" timeout -k 10 "$limit" mpiexec -n 2 "$tsp" "$@" > out.txt 2>&1 || rc=$?
    [ "$rc" -ne 0 ] || break
    [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] ||
      fail "$label: the fault at NCCL operation $n hung the job (stopped after ${limit} s)"
    grep -qF "$expect1" out.txt && grep -qF "$expect2" out.txt || {
      head -20 out.txt
      fail "$label: the fault at NCCL operation $n ended the job (status $rc) without saying why"
    }
    faulted=$((faulted + 1))
    n=$((n + stride))
  done
  [ "$faulted" -gt 0 ] || fail "$label: no run was faulted (does it use NCCL?)"
  echo "ok: $label: $faulted faulted runs (operations 1 to $((n - stride)), every ${stride}) ended with the error; operation $n is past the end"
}

grad_args=(grad --device cuda --model init --tokens corpus.bin --batch 2 --seq 64)
sweep lose "grad, tsp" 3 "${grad_args[@]}" --layout tsp --out g.safetensors
sweep lose "grad, fsdp-cp" 7 "${grad_args[@]}" --layout fsdp-cp --out g.safetensors
# A stuck peer waits out the timeout in each run: a few points only. 3 s is far beyond any
# transfer here (milliseconds), so the passing run is not cut short.
TSP_NCCL_TIMEOUT=3 sweep stall "grad, tsp" 20 "${grad_args[@]}" --layout tsp --out g.safetensors
sweep lose "train 2 steps and save, tsp" 23 train --device cuda --model init --data corpus.txt \
  --layout tsp --batch 2 --seq 64 --steps 2 --val-every 0 --progress lines --save ck
echo "nccl_lost_peer: OK"
