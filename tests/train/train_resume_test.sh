#!/usr/bin/env bash
# `tsp train` checkpoints end to end (tiny model, single layout, 8 steps):
#   - resuming under the same layout and world continues bit for bit (the losses of the metrics
#     files are compared as text: JSON numbers are written round-trip exact);
#   - resuming under another degree (dp 2 -> 1 rank) matches to fp32 rounding;
#   - a run killed with SIGKILL while writing a checkpoint (stage "write": half the files in the
#     temporary directory) or between its renames (stage "swap": the old one moved to <dir>.old)
#     leaves a checkpoint that resumes, again bit for bit;
#   - the checkpoint is a Hugging Face model directory PyTorch reads (when torch is installed).
# Usage: bash train_resume_test.sh <build-dir> <source-dir>
source "$(dirname "$0")/../shell_common.sh"
cd "$tmp"

write_verses 1500 corpus.txt
common=(--data corpus.txt --preset tiny --batch 4 --seq 32 --steps 8 --warmup 2 --lr 1e-2
  --val-every 4 --val-windows 4 --progress lines --log-every 100)
train() {  # ranks, extra args...
  local n=$1
  shift
  mpiexec -n "$n" "$tsp" train "${common[@]}" "$@"
}
losses() { grep -o '"step":[0-9]*,"loss":[^,]*' "$1"; }  # "step":N,"loss":X per line
# Wait for the paused rank 0 of a background job, kill it with SIGKILL, let mpiexec end.
kill_during_save() {  # stage, checkpoint dir, metrics file
  TSP_TEST_PAUSE_IN_SAVE=$1 mpiexec -n 2 "$tsp" train "${common[@]}" --layout single --dp 2 \
    --resume "$2" --save "$2" --save-every 2 --metrics "$3" > "kill_$1.out" 2> "kill_$1.err" &
  local job=$! pid=""
  for _ in $(seq 1 600); do
    # (the background job may not have created its stderr file yet)
    pid=$(sed -n 's/.*paused at stage .*, pid \([0-9]*\).*/\1/p' "kill_$1.err" 2> /dev/null || true)
    [ -n "$pid" ] && break
    sleep 0.1
  done
  [ -n "$pid" ] || { cat "kill_$1.err"; fail "the save never paused at stage $1"; }
  kill -9 "$pid"
  if wait "$job"; then fail "mpiexec succeeded although rank 0 was killed"; fi
}

# A: 8 uninterrupted steps, 2 ranks (single layout, 2 data-parallel replicas).
train 2 --layout single --dp 2 --metrics A.jsonl > A.out
[ "$(losses A.jsonl | wc -l)" -eq 8 ] || fail "expected 8 metrics lines"
grep -q '"grad_norm"' A.jsonl && grep -q '"tokens_per_s"' A.jsonl && grep -q '"val_loss"' A.jsonl &&
  grep -q '"optimizer":' A.jsonl || fail "metrics lack grad_norm/tokens_per_s/val_loss/peak memory"

# B: the same run cut after step 4, then resumed.
train 2 --layout single --dp 2 --stop-at 4 --save ck --metrics B.jsonl > B1.out
for f in config.json model.safetensors optimizer.exp_avg.safetensors \
  optimizer.exp_avg_sq.safetensors trainer_state.json; do
  [ -s "ck/$f" ] || fail "checkpoint lacks $f"
done
grep -q '"step": 4' ck/trainer_state.json || fail "checkpoint is not at step 4"
cp -r ck ck4
train 2 --layout single --dp 2 --resume ck --save ck --metrics B.jsonl > B2.out
diff <(losses A.jsonl) <(losses B.jsonl) || fail "resumed losses differ from the uninterrupted run"
echo "resume, same layout: 8 losses identical bit for bit"

# C: resume the step-4 checkpoint on 1 rank (another degree: the gradient is summed in another
# order). fp32 rounding differences (~1e-7 relative per gradient) pass through 4 Adam steps at
# lr 1e-2; the losses (~3-5 nats) agree to ~1e-5; 1e-4 absolute is far below a real error (a
# wrong moment, step count or data position moves them by > 1e-2).
cp -r ck4 ckc
train 1 --layout single --resume ckc --metrics C.jsonl > C.out
paste -d' ' <(losses A.jsonl | tail -4) <(losses C.jsonl) | sed 's/"step":[0-9]*,"loss"://g' |
  awk '{d = $1 - $2; if (d < 0) d = -d; if (d > 1e-4) bad = 1; if (d > m) m = d}
       END {printf "resume on another degree: max |loss diff| %.2e\n", m; exit bad}' ||
  fail "cross-degree resume differs beyond 1e-4"

# D: SIGKILL while writing the step-6 checkpoint: ck stays the complete step-4 one.
cp -r ck4 ckd
kill_during_save write ckd D.jsonl
[ "$(losses D.jsonl | wc -l)" -eq 2 ] || fail "the killed run should have logged steps 5 and 6"
grep -q '"step": 4' ckd/trainer_state.json || fail "killed save damaged the previous checkpoint"
ls -d ckd.tmp-* > /dev/null 2>&1 || fail "expected the killed save's temporary directory"
train 2 --layout single --dp 2 --resume ckd --save ckd --metrics D.jsonl > D.out
# The resumed run drops the killed run's lines past its checkpoint (steps 5, 6) and rewrites them.
diff <(losses A.jsonl | tail -4) <(losses D.jsonl) || fail "resume after a killed save differs"
! ls -d ckd.tmp-* > /dev/null 2>&1 || fail "the next save did not clean the stale temporary directory"
echo "kill -9 during a save (write stage): previous checkpoint intact, resume bit for bit"

# E: SIGKILL between the renames: only ckd.old is complete, and resume must find it.
cp -r ck4 cke
kill_during_save swap cke E.jsonl
[ ! -e cke ] && [ -f cke.old/trainer_state.json ] || fail "expected only cke.old after the kill"
train 2 --layout single --dp 2 --resume cke --save cke --metrics E.jsonl > E.out
grep -q "resumed from cke.old" E.out || fail "resume did not use cke.old"
diff <(losses A.jsonl | tail -4) <(losses E.jsonl) || fail "resume from <dir>.old differs"
[ -f cke/trainer_state.json ] && [ ! -e cke.old ] || fail "the save after resuming did not restore cke"
echo "kill -9 between the renames: resumed from <dir>.old bit for bit"

# F: PyTorch reads the model directory (numpy parses the same bytes when torch is missing).
if /usr/bin/python3 -c "import numpy" 2> /dev/null; then
  /usr/bin/python3 - ck << 'PY' || fail "the checkpoint is not readable as safetensors"
import json, struct, sys
import numpy as np
try:
    import torch
except ImportError:
    torch = None
d = sys.argv[1]
cfg = json.load(open(d + "/config.json"))
for name in ("model.safetensors", "optimizer.exp_avg.safetensors", "optimizer.exp_avg_sq.safetensors"):
    raw = open(f"{d}/{name}", "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8:8 + n])
    base = 8 + n
    t = {}
    for k, v in hdr.items():
        if k == "__metadata__":
            continue
        assert v["dtype"] == "F32", (name, k, v["dtype"])
        buf = bytearray(raw[base + v["data_offsets"][0]:base + v["data_offsets"][1]])
        a = np.frombuffer(buf, dtype=np.float32).reshape(v["shape"])
        t[k] = torch.from_numpy(a.copy()) if torch else a
    assert tuple(t["model.embed_tokens.weight"].shape) == (cfg["vocab_size"], cfg["hidden_size"]), name
    assert len(t) == 2 + 9 * cfg["num_hidden_layers"] + (0 if cfg["tie_word_embeddings"] else 1), len(t)
    assert all(bool(np.isfinite(np.asarray(x)).all()) for x in t.values()), name
print("checkpoint read by", "torch" if torch else "numpy", ":", len(t), "tensors per file")
PY
else
  echo "numpy not installed: safetensors read check skipped"
fi
echo "PASS"
