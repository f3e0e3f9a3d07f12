# scripts/gpu_check.sh, the one prepared script a lent GPU machine runs, checked here without a GPU
# (bash tests/scripts/gpu_check_test.sh <build-dir> <source-dir>). A GPU session is rare and
# short: a fault in the script's own plumbing would cost the whole run, so it is tested in CI.
#
# 1. A dry run over every section: no device, so every GPU step is SKIP with its reason and none
#    FAILs; the output folder holds what the device tool brings back of $OUT (at most 8 plain
#    files, 16 MiB each, plain names).
# 2. The profile and sanitize sections with stand-ins for nvidia-smi, ncu and compute-sanitizer
#    (in a private PATH; they record their arguments, and ncu's --import prints exports laid out as
#    Nsight Compute's raw and source pages are: a header row, the raw page's units row, one row
#    per launch or instruction). What is checked is the script's side only: the commands it
#    builds, the report's tables read from those exports, the results archive. Whether the real
#    tools accept the commands shows on the GPU machine (the steps' logs in results.tar.gz).
source "$(dirname "$0")/../shell_common.sh"

if [ ! -x "$build/tests/cuda_backend_test" ]; then
  echo "skipped: $build is not a CUDA build (no tests/cuda_backend_test): gpu_check runs CUDA builds"
  exit 77
fi
check=$src/scripts/gpu_check.sh

# within_device_limits DIR: at most 8 plain files, none over 16 MiB, named [A-Za-z0-9._-].
within_device_limits() {
  local n=0 f
  for f in "$1"/*; do
    n=$((n + 1))
    [ -f "$f" ] || fail "$f is not a plain file"
    [ "$(stat -c %s "$f")" -le $((16 * 1024 * 1024)) ] || fail "$f is over 16 MiB"
    [[ ! $(basename "$f") =~ [^A-Za-z0-9._-] ]] || fail "$f: a name the device tool refuses"
  done
  [ $n -le 8 ] || fail "$1 holds $n files; the device tool brings back 8"
}

# The PATH without the folders holding a real nvidia-smi, ncu or compute-sanitizer: a dry run even
# on a machine with a GPU.
plain_path=$(tr ':' '\n' <<<"$PATH" | while read -r d; do
  [ -x "$d/nvidia-smi" ] || [ -x "$d/ncu" ] || [ -x "$d/compute-sanitizer" ] || echo "$d"
done | paste -sd:)

# ---- 1. dry run ---------------------------------------------------------------------------------
out1=$tmp/dry
PATH=$plain_path bash "$check" "$out1" --prebuilt "$build" >"$tmp/dry.log" 2>&1 ||
  { tail -30 "$tmp/dry.log"; fail "the dry run exited non-zero"; }
within_device_limits "$out1"
for f in report.md steps.json results.tar.gz; do
  [ -s "$out1/$f" ] || fail "the dry run wrote no $f"
done
python3 - "$out1/steps.json" <<'EOF' || fail "the dry run's steps"
import json, sys
steps = json.load(open(sys.argv[1]))
bad = [s for s in steps if s['status'] == 'FAIL' or (s['status'] == 'SKIP' and not s['note'])]
assert not bad, bad
for section in ('test cuda_attention_test', 'bench attention tsp', 'profile attention_v1',
                'sanitize racecheck flash'):
    assert any(s['step'].startswith(section) for s in steps), section + ' missing'
skipped = [s for s in steps if s['step'].startswith(('bench', 'profile', 'sanitize'))]
assert all(s['status'] == 'SKIP' and s['note'] == 'no device' for s in skipped), skipped
EOF
# (The listing first: grep -q would stop reading, and pipefail would count tar's broken pipe.)
listing=$(tar -tzf "$out1/results.tar.gz")
grep -q '^logs/env.txt$' <<<"$listing" || fail "results.tar.gz holds no logs/env.txt"
echo "ok: dry run, $(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$out1/steps.json") steps"

# ---- 2. profile and sanitize, with stand-in tools ------------------------------------------------
fake=$tmp/bin
mkdir -p "$fake"
calls=$tmp/calls.txt
cat >"$fake/nvidia-smi" <<'EOF'
#!/bin/bash
case "$*" in
  -L) echo "GPU 0: Stand-in GPU (UUID: GPU-0)" ;;
  *) echo "name, driver_version"; echo "Stand-in GPU, 0.0" ;;
esac
EOF
cat >"$fake/ncu" <<'EOF'
#!/bin/bash
echo "ncu $*" >>"$TSP_TEST_CALLS"
[ "${1:-}" = --version ] && { echo "Version 0.0 (stand-in)"; exit 0; }
if [ "${1:-}" = --import ]; then
  case "$*" in
    *"--page raw"*)
      echo '==PROF== a note before the table'
      echo '"ID","Process ID","Kernel Name","gpu__time_duration.sum","launch__registers_per_thread","launch__shared_mem_per_block_dynamic","launch__shared_mem_per_block_static","sm__warps_active.avg.pct_of_peak_sustained_active","sm__maximum_warps_per_active_cycle_pct","sm__throughput.avg.pct_of_peak_sustained_elapsed","sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active","smsp__issue_active.avg.pct_of_peak_sustained_active","l1tex__throughput.avg.pct_of_peak_sustained_active","l1tex__data_pipe_lsu_wavefronts_mem_shared.sum","l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum","l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum","l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio"'
      echo '"","","","nsecond","register/thread","byte","byte","%","%","%","%","%","%","","","byte","byte","inst","inst","inst"'
      echo '"0","1","flash_forward_kernel<128, false>","3,125,000","206","105,472","0","24.5","25","61.2","48.7","55.1","70.3","1,000","250","0","0","0.5","1.5","2"'
      echo '"1","1","flash_backward_kernel<128, 32, false>","15,000,000","255","57,856","1,024","23","25","40","30","35","50","2,000","0","2,000,000","3,000,000","3","0.5","0.5"' ;;
    *"--page source"*)
      echo '"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","Instructions Executed"'
      echo '"0x10","HMMA.16816.F32.BF16 R4, R8, R12, R4","60","40","100"'
      echo '"0x20","@P0 BAR.SYNC.DEFER_BLOCKING 0x0","30","30","10"'
      echo '"0x30","LDSM.16.M88.4 R8, [R2]","10","5","50"'
      echo '"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","Instructions Executed"'
      echo '"0x10","BAR.SYNC 0x0","75","75","10"'
      echo '"0x20","RED.E.ADD.F32.FTZ.RN.STRONG.GPU [R2], R5","25","20","10"' ;;
    *) echo "details page of $2" ;;
  esac
  exit 0
fi
while [ $# -gt 0 ]; do  # the profile run: the report file, not the program (no GPU here)
  [ "$1" = --export ] && echo "stand-in report" >"$2.ncu-rep"
  shift
done
EOF
cat >"$fake/compute-sanitizer" <<'EOF'
#!/bin/bash
echo "compute-sanitizer $*" >>"$TSP_TEST_CALLS"
[ "${1:-}" = --version ] && { echo "Version 0.0 (stand-in)"; exit 0; }
while [ "${1:-}" != "${1#--}" ]; do  # options, each with its value
  shift 2
done
exec "$@"  # the test itself: it skips, there is no device
EOF
chmod +x "$fake"/*
out2=$tmp/tools
TSP_TEST_CALLS=$calls PATH="$fake:$plain_path" bash "$check" "$out2" --prebuilt "$build" \
  --only profile,sanitize >"$tmp/tools.log" 2>&1 || { tail -30 "$tmp/tools.log"; fail "the run with stand-in tools exited non-zero"; }
within_device_limits "$out2"

# The commands: the first COUNT matching launches of each implementation, the full set, the
# card's clocks, each report exported three ways; the sanitizers on the flash tests.
grep -q "^ncu --set full --import-source yes --clock-control none --kernel-name regex:flash_(forward|backward)_kernel --launch-count 2 --force-overwrite --export .*/attention_v1 .*/bench_attention --device cuda --dtype bf16 --sizes 8192 .* --flash v1$" "$calls" ||
  { cat "$calls"; fail "ncu's command for flash v1"; }
grep -q "^ncu .*--launch-count 3 .*--flash v2$" "$calls" || fail "ncu's command for flash v2"
grep -q "^ncu .*--launch-count 6 .*torch_attention.py --sizes 8192 " "$calls" || fail "ncu's command for PyTorch"
[ "$(grep -c '^ncu --import .*attention_v1.ncu-rep --page' "$calls")" -eq 3 ] || fail "the three exports of attention_v1"
for tool in memcheck racecheck synccheck; do
  grep -q "^compute-sanitizer --tool $tool --error-exitcode 9 .*cuda_attention_test --gtest_filter=CudaFlash.ForwardMatchesReference/\*:CudaFlash.BackwardMatchesReference/\*$" "$calls" ||
    { cat "$calls"; fail "compute-sanitizer $tool on the flash tests"; }
done
grep -q "^compute-sanitizer --tool memcheck .*cuda_backend_test$" "$calls" || fail "memcheck on the backend's ops"

# The report's table, from the stand-in exports: units converted (ns to ms, bytes to KB and MB),
# thousands separators read, stall reasons as shares, SASS opcodes (predicates and modifiers
# dropped) as shares of the stall samples, per kernel.
report=$out2/report.md
grep -q '^| tsp flash v1 | flash_forward_kernel<128, false> | 3.125 | 206 | 103.0 | 24 / 25 | 61 | 49 | 55 | 70 | 25 | 0.0 | mio_throttle 50%, long_scoreboard 38%, barrier 12% | HMMA 60%, BAR 30%, LDSM 10% |$' "$report" ||
  { grep -A8 'Nsight Compute' "$report"; fail "the forward's row of the profile table"; }
grep -q '^| tsp flash v1 | flash_backward_kernel<128, 32, false> | 15.000 | 255 | 57.5 | 23 / 25 | 40 | 30 | 35 | 50 | 0 | 5.0 | barrier 75%, long_scoreboard 12%, mio_throttle 12% | BAR 75%, RED 25% |$' "$report" ||
  { grep -A8 'Nsight Compute' "$report"; fail "the backward's row of the profile table"; }
listing=$(tar -tzf "$out2/results.tar.gz")
grep -q '^raw/ncu/attention_v1.sass.csv$' <<<"$listing" || fail "results.tar.gz lacks the SASS export"
grep -q '^raw/ncu/attention_v1.ncu-rep$' <<<"$listing" || fail "results.tar.gz lacks the report"
echo "ok: the profile and sanitize sections with stand-in tools"
