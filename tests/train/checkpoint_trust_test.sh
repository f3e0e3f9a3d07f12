#!/usr/bin/env bash
# Checkpoints cannot rot unnoticed, and `tsp train` never saves or resumes from a damaged state:
#   - every file of a checkpoint is checked against the size and SHA-256 its trainer_state.json
#     records: one flipped byte in any file, a NaN in a moment, swapped, zeroed, truncated or
#     missing files all fail the resume, naming the file;
#   - the trainer state's values are validated (a state edited and re-signed still cannot claim
#     step 9000 with 16 windows read, or batch 0);
#   - a checkpoint written before checksums (format 1) still resumes, with a warning, and its
#     moments are still checked (finite, exp_avg_sq >= 0, files not swapped);
#   - a step that makes the weights non-finite stops with exit code 2 without saving: the good
#     checkpoint survives, is named, and resumes;
#   - one run at a time writes a --save directory (flock on <dir>.lock): a second is refused
#     naming the holder, and the first completes with a good checkpoint;
#   - an unwritable --save and a failing --metrics are errors (at the start for --save).
# Usage: bash checkpoint_trust_test.sh <build-dir> <source-dir>
source "$(dirname "$0")/../shell_common.sh"
cd "$tmp"

write_verses 1500 corpus.txt
common=(--data corpus.txt --preset tiny --layout single --batch 4 --seq 32 --warmup 1
  --val-every 0 --progress lines)
# expect_error "what" "message fragment" train-args...: the run must fail and say the fragment.
# One rank without mpiexec (MPI's singleton start, as tests/cli/bad_input_test.sh): the same code
# path, a fifth of the start-up.
expect_error() { expect_failure "$1" "$2" "$tsp" train "${common[@]}" "${@:3}"; }
# py FILE OFFSET-FROM-PAYLOAD PACKED: overwrite bytes of a safetensors payload (after the header).
poke() {
  python3 - "$@" << 'PY'
import struct, sys
path, off, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
b = bytearray(open(path, "rb").read())
base = 8 + struct.unpack("<Q", b[:8])[0]
if what == "zero":
    b[base:] = bytes(len(b) - base)
else:
    val = {"nan": float("nan"), "neg": -1.0}[what]
    b[base + off:base + off + 4] = struct.pack("<f", val)
open(path, "wb").write(b)
PY
}
flip() {  # FILE: invert the byte in the middle of the file
  python3 -c '
import sys
p = sys.argv[1]; b = bytearray(open(p, "rb").read()); b[len(b) // 2] ^= 0xFF
open(p, "wb").write(b)' "$1"
}
# resign DIR KEY VALUE: edit the trainer state and recompute its own checksum, as a buggy writer
# (not a damaged disk) would: the value checks must catch what the checksum cannot.
resign() {
  python3 - "$@" << 'PY'
import hashlib, json, sys
d, key, value = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
p = d + "/trainer_state.json"
j = json.load(open(p))
j[key] = value
j.pop("sha256")
j["sha256"] = hashlib.sha256(json.dumps(j, separators=(",", ":")).encode()).hexdigest()
json.dump(j, open(p, "w"), indent=2)
PY
}
legacy() {  # DIR: strip the checksums, as tsp wrote trainer states before they existed
  python3 - "$1" << 'PY'
import json, sys
p = sys.argv[1] + "/trainer_state.json"
j = json.load(open(p))
for k in ("format", "files", "sha256"):
    j.pop(k)
json.dump(j, open(p, "w"), indent=2)
PY
}

mpiexec -n 1 "$tsp" train "${common[@]}" --steps 4 --save good > good.out
(cd good && sha256sum model.safetensors | cut -d' ' -f1) > good.sum
grep -q "$(cat good.sum)" good/trainer_state.json ||
  fail "trainer_state.json does not record model.safetensors' sha256sum"
cp -r good pristine

# Damage to any file fails the resume, naming the file.
for f in config.json model.safetensors optimizer.exp_avg.safetensors \
  optimizer.exp_avg_sq.safetensors trainer_state.json; do
  rm -rf bad && cp -r pristine bad
  flip "bad/$f"
  expect_error "one flipped byte in $f" "bad/$f" --steps 6 --resume bad
done
rm -rf bad && cp -r pristine bad && flip bad/model.safetensors
expect_error "a damaged checkpoint as --model" "bad/model.safetensors does not match" --steps 2 \
  --model bad
# Every command that reads a model directory verifies a checkpoint's recorded checksums first.
"$tsp" encode --text corpus.txt --out corpus.bin > /dev/null
for cmd in "grad --tokens corpus.bin --batch 1 --seq 16 --out g.safetensors" \
  "generate --prompt abc --max-new 4" "bench --seq 32 --repeats 1"; do
  # shellcheck disable=SC2086
  if out=$("$tsp" ${cmd%% *} --model bad ${cmd#* } 2>&1); then
    fail "${cmd%% *} read a damaged checkpoint"
  fi
  grep -qF "bad/model.safetensors does not match" <<< "$out" || {
    echo "$out" | head
    fail "${cmd%% *}: no checksum message"
  }
  echo "ok: ${cmd%% *} verifies a checkpoint given as --model"
done
# On 2 ranks, rank 0's verification is the message (the other rank waits for it).
rm -rf bad && cp -r pristine bad && flip bad/trainer_state.json
out=$(mpiexec -n 2 "$tsp" train "${common[@]}" --dp 2 --steps 6 --resume bad 2>&1) &&
  fail "2 ranks resumed from a damaged trainer state"
grep -q "error: \[rank 0\] bad/trainer_state.json" <<< "$out" || { echo "$out"; fail "2 ranks: no rank-0 message"; }
echo "ok: 2 ranks: a damaged trainer state, reported by rank 0"
rm -rf bad && cp -r pristine bad && poke bad/optimizer.exp_avg.safetensors 400 nan
expect_error "a NaN in exp_avg" "bad/optimizer.exp_avg.safetensors does not match the SHA-256" \
  --steps 6 --resume bad
rm -rf bad && cp -r pristine bad
mv bad/optimizer.exp_avg.safetensors m && mv bad/optimizer.exp_avg_sq.safetensors \
  bad/optimizer.exp_avg.safetensors && mv m bad/optimizer.exp_avg_sq.safetensors
expect_error "swapped moment files" "bad/optimizer.exp_avg.safetensors does not match" \
  --steps 6 --resume bad
rm -rf bad && cp -r pristine bad && poke bad/optimizer.exp_avg_sq.safetensors 0 zero
expect_error "a zeroed moment payload" "bad/optimizer.exp_avg_sq.safetensors does not match" \
  --steps 6 --resume bad
rm -rf bad && cp -r pristine bad && truncate -s -4 bad/model.safetensors
expect_error "a truncated file" "bad/model.safetensors has" --steps 6 --resume bad
rm -rf bad && cp -r pristine bad && rm bad/config.json
expect_error "a missing file" "bad/config.json is missing" --steps 6 --resume bad
rm -rf bad && cp -r pristine bad && sed -i 's/"step": 4/"step": 9000/' bad/trainer_state.json
expect_error "an edited trainer state" "bad/trainer_state.json does not match its own SHA-256" \
  --steps 6 --resume bad

# The state's values, re-signed so that only the value checks can object.
rm -rf bad && cp -r pristine bad && resign bad step 9000
expect_error "step beyond the data position" "data position 16 is below the step 9000" \
  --steps 10000 --resume bad
rm -rf bad && cp -r pristine bad && resign bad batch 0
expect_error "batch 0 in the state" "batch 0, seq 32, accum 1 (each must be positive)" \
  --steps 6 --resume bad
rm -rf bad && cp -r pristine bad && resign bad dp 3
expect_error "dp not dividing world" "world 1, dp 3, tp 1 do not describe a layout" \
  --steps 6 --resume bad
expect_error "step beyond --steps" "the checkpoint is at step 4, beyond --steps 3" \
  --steps 3 --resume good
expect_error "nothing left to train" "nothing to train: good is at step 4" --steps 4 --resume good

# A checkpoint without checksums (format 1) resumes with a warning; its moments are still checked.
rm -rf old && cp -r pristine old && legacy old
out=$(mpiexec -n 1 "$tsp" train "${common[@]}" --steps 6 --resume old 2>&1) ||
  { echo "$out"; fail "a format-1 checkpoint did not resume"; }
grep -q "recorded no checksums" <<< "$out" || fail "no warning for a checkpoint without checksums"
echo "ok: a checkpoint without checksums resumes with a warning"
rm -rf bad && cp -r old bad && poke bad/optimizer.exp_avg.safetensors 400 nan
expect_error "format 1: a NaN in exp_avg" "1 non-finite first-moment (exp_avg) values" \
  --steps 6 --resume bad
rm -rf bad && cp -r old bad && poke bad/optimizer.exp_avg_sq.safetensors 400 neg
expect_error "format 1: a negative exp_avg_sq" "1 non-finite or negative second-moment" \
  --steps 6 --resume bad
rm -rf bad && cp -r old bad
mv bad/optimizer.exp_avg.safetensors m && mv bad/optimizer.exp_avg_sq.safetensors \
  bad/optimizer.exp_avg.safetensors && mv m bad/optimizer.exp_avg_sq.safetensors
expect_error "format 1: swapped moment files" "holds \"AdamW exp_avg_sq\", not \"AdamW exp_avg\"" \
  --steps 6 --resume bad

# A finite gradient with an absurd learning rate overflows the weights: exit code 2 at once, no
# checkpoint from them, the good one named, intact and resumable.
set +e
mpiexec -n 1 "$tsp" train "${common[@]}" --steps 8 --resume good --save good --save-every 1 \
  --lr 1e39 > lr.out 2> lr.err
rc=$?
set -e
[ "$rc" -eq 2 ] || { cat lr.err; fail "--lr 1e39 exited with $rc, not 2"; }
grep -q "non-finite weights" lr.err && grep -q "the last good checkpoint is good (step 4)" lr.err ||
  { cat lr.err; fail "--lr 1e39: the message does not name the weights and the good checkpoint"; }
diff -r pristine good > /dev/null || fail "--lr 1e39 changed the good checkpoint"
mpiexec -n 1 "$tsp" train "${common[@]}" --steps 6 --resume good > /dev/null ||
  fail "the good checkpoint does not resume after --lr 1e39"
echo "ok: --lr 1e39 stopped with exit code 2, good checkpoint kept and resumable"

# Two runs on one --save: the second is refused while the first holds the lock (the first pauses
# in its save until the second has been refused, at most 60 s), and the first completes with a
# good checkpoint.
TSP_TEST_PAUSE_IN_SAVE=write TSP_TEST_PAUSE_SECONDS=60 TSP_TEST_PAUSE_RELEASE="$PWD/release" \
  mpiexec -n 1 "$tsp" train "${common[@]}" --steps 6 --save shared > first.out 2> first.err &
first=$!
for _ in $(seq 1 300); do
  grep -qs "paused at stage write" first.err && break
  sleep 0.1
done
grep -q "paused at stage write" first.err || { cat first.err; fail "the first run never paused"; }
expect_error "a second run on the same --save" "--save shared is in use by another training run (pid" \
  --steps 2 --save shared
ls -d shared.tmp-* > /dev/null 2>&1 || fail "the refused run removed the first run's save"
touch release
wait "$first" || { cat first.err; fail "the first run failed"; }
grep -q '"step": 6' shared/trainer_state.json || fail "the first run's checkpoint is not at step 6"
mpiexec -n 1 "$tsp" train "${common[@]}" --steps 8 --resume shared > /dev/null ||
  fail "the first run's checkpoint does not resume"
echo "ok: the second run was refused; the first completed with a good checkpoint"

# Output that cannot be written is an error, for --save before training starts.
out=$(mpiexec -n 1 "$tsp" train "${common[@]}" --steps 2 --save corpus.txt/ck 2>&1) &&
  fail "--save under a regular file succeeded"
grep -q "cannot create the directory corpus.txt" <<< "$out" || { echo "$out"; fail "no --save message"; }
! grep -q "^step " <<< "$out" || fail "an unwritable --save was found only after training"
echo "ok: an unwritable --save fails before training"
expect_error "--metrics /dev/full" "writing metrics file /dev/full failed" --steps 6 \
  --resume good --metrics /dev/full
diff -r pristine good > /dev/null || fail "a failing --metrics changed the good checkpoint"
echo "PASS"
