#!/usr/bin/env bash
# A device fault or a lost or stuck NCCL peer ends the job with an error that says what happened,
# at whatever point of the run it happens: no rank hangs, nothing exits 0. Under CUDA emulation
# only, which injects the faults (tests/cuda_emulation/README.md, "Faults" and "NCCL"):
#   lose    TSP_EMU_NCCL_LOSE_PEER=n: a process's n-th NCCL operation does what real NCCL's does
#           when a peer dies or the network fails: it never completes, and the communicator's
#           asynchronous error becomes ncclRemoteError;
#   stall   TSP_EMU_NCCL_STALL_PEER=n: it never completes and NCCL reports nothing (a stuck
#           peer), which only tsp's timeout (TSP_NCCL_TIMEOUT) can end;
#   kernel  TSP_EMU_FAULT_KERNEL=n: a process's n-th kernel faults, as one that touches an illegal
#           address (the device's sticky error).
# A sweep runs a command with n = 1, 1 + stride, … until a run passes (n beyond the run's last
# operation), so the fault lands in every phase: set-up, forward, backward, the gradients'
# gather, the optimizer, the checkpoint. The fault is in every rank, or (sweep0) in rank 0 alone
# while the others go on and wait for it. Every faulted run must exit non-zero within the time
# limit and say why.
#
# Without the host's polling waits (src/backend/cuda/cuda_common.h, wait_for_stream), a lost peer
# in the backward or the gather hangs for ever: a download waits for a compute stream that waits
# for the lost transfer.
# Usage: bash device_faults.sh <emulated-cli-dir> <source-dir>: the directory that holds the
# emulated tsp (build/tests/cuda_emulation/cli, laid out as a build directory).
source "$(dirname "$0")/../shell_common.sh"
cd "$tmp"

export TSP_COMM=nccl  # every emulated process has a device of its own: NCCL, as one GPU per rank
unset TSP_EMU_SHARED_DEVICE
limit=60              # seconds; a healthy run here takes 1-3

for i in $(seq 1 300); do echo "verse $i: and the earth was without form, and void"; done > corpus.txt
"$tsp" init --preset tiny --seed 1 --out init > /dev/null
"$tsp" encode --text corpus.txt --out corpus.bin > /dev/null

# run_faulted WHERE SETTING=N ARGS...: `tsp ARGS` on 2 ranks, SETTING in every rank (WHERE =
# all) or in rank 0 alone (WHERE = rank0); its output in out.txt, its status returned.
run_faulted() {
  local where=$1 setting=$2
  shift 2
  # SIGTERM first: mpiexec passes it on to the ranks, so a hung run leaves no process behind.
  if [ "$where" = all ]; then
    env "$setting" timeout -k 10 "$limit" mpiexec -n 2 "$tsp" "$@" > out.txt 2>&1
  else
    timeout -k 10 "$limit" mpiexec -n 1 env "$setting" "$tsp" "$@" : -n 1 "$tsp" "$@" \
      > out.txt 2>&1
  fi
}

# sweep WHERE FAULT LABEL STRIDE ARGS...: FAULT (lose, stall, kernel) at n = 1, 1 + STRIDE, ...
# until a run passes.
sweep() {
  local where=$1 fault=$2 label="$3 ($2, $1)" stride=$4 n=1 rc faulted=0 setting expect1 expect2
  shift 4
  case $fault in
    lose) setting=TSP_EMU_NCCL_LOSE_PEER expect1="lost its peer"
      expect2="A transfer of this job cannot finish" ;;
    stall) setting=TSP_EMU_NCCL_STALL_PEER expect1="has not finished, and NCCL reports no error"
      expect2="TSP_NCCL_TIMEOUT sets the limit" ;;
    kernel) setting=TSP_EMU_FAULT_KERNEL expect1="injected fault in kernel"
      expect2="unspecified launch failure" ;;
  esac
  while :; do
    rc=0
    run_faulted "$where" "$setting=$n" "$@" || rc=$?
    [ "$rc" -ne 0 ] || break
    [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] ||
      fail "$label: the fault at operation $n hung the job (stopped after ${limit} s)"
    grep -qF "$expect1" out.txt && grep -qF "$expect2" out.txt || {
      head -20 out.txt
      fail "$label: the fault at operation $n ended the job (status $rc) without saying why"
    }
    faulted=$((faulted + 1))
    n=$((n + stride))
  done
  [ "$faulted" -gt 0 ] || fail "$label: no run was faulted"
  echo "ok: $label: $faulted faulted runs (operations 1 to $((n - stride)), every ${stride}) ended with the error; operation $n is past the end"
}

grad_args=(grad --device cuda --model init --tokens corpus.bin --batch 2 --seq 64)
train_args=(train --device cuda --model init --data corpus.txt --layout tsp --batch 2 --seq 64
  --steps 2 --val-every 0 --progress lines --save ck)
sweep all lose "grad, tsp" 7 "${grad_args[@]}" --layout tsp --out g.safetensors
sweep all lose "grad, fsdp-cp" 13 "${grad_args[@]}" --layout fsdp-cp --out g.safetensors
sweep rank0 lose "grad, tsp" 10 "${grad_args[@]}" --layout tsp --out g.safetensors
sweep all lose "train 2 steps and save, tsp" 31 "${train_args[@]}"
# A stuck peer waits out the timeout in each run: a few points only. 3 s is far beyond any
# transfer here (milliseconds).
TSP_NCCL_TIMEOUT=3 sweep all stall "grad, tsp" 20 "${grad_args[@]}" --layout tsp --out g.safetensors
sweep rank0 kernel "grad, tsp" 17 "${grad_args[@]}" --layout tsp --out g.safetensors
sweep all kernel "train 2 steps and save, tsp" 97 "${train_args[@]}"
# A timeout that is not a number of seconds is refused at set-up, on every rank.
rc=0
TSP_NCCL_TIMEOUT=soon timeout -k 10 "$limit" mpiexec -n 2 "$tsp" "${grad_args[@]}" --layout tsp \
  --out g.safetensors > out.txt 2>&1 || rc=$?
[ "$rc" -ne 0 ] && grep -qF "TSP_NCCL_TIMEOUT='soon' is not a number of seconds" out.txt ||
  { head -20 out.txt; fail "TSP_NCCL_TIMEOUT=soon: status $rc, no clear error"; }
echo "ok: TSP_NCCL_TIMEOUT=soon refused"
echo "device_faults: OK"
