#!/usr/bin/env bash
# `tsp train` rejects bad inputs up front with messages a user can act on, and stops on a
# non-finite loss or gradient keeping the last good checkpoint.
# Usage: bash train_errors_test.sh <build-dir> <source-dir>
source "$(dirname "$0")/../shell_common.sh"
cd "$tmp"

write_verses 1500 corpus.txt
common=(--preset tiny --layout single --batch 4 --seq 32 --warmup 1 --val-every 0
  --progress lines)
# expect_error "what" "message fragment" train-args...: the run must fail and say the fragment.
# One rank without mpiexec (MPI's singleton start): the same code path, a fifth of the start-up
# (tests/cli/bad_input_test.sh does the same; abort_test covers errors under mpiexec).
expect_error() { expect_failure "$1" "$2" "$tsp" train "${common[@]}" "${@:3}"; }

expect_error "missing data" "cannot open data file missing.txt" --data missing.txt
head -c 200 corpus.txt > small.txt
expect_error "corpus too small" "use a larger corpus or a smaller --seq" --data small.txt
# llm.c header (magic 20240520, version 1) announcing 1000 uint16 tokens, holding 10.
/usr/bin/env python3 -c '
import struct, sys
h = [0] * 256; h[0], h[1], h[2] = 20240520, 1, 1000
sys.stdout.buffer.write(struct.pack("<256i", *h) + struct.pack("<10H", *range(10)))' > bad.bin
expect_error "truncated token file" "bad.bin" --data bad.bin
/usr/bin/env python3 -c '
import struct, sys
h = [0] * 256; h[0], h[1], h[2] = 20240520, 1, 5000
sys.stdout.buffer.write(struct.pack("<256i", *h) + struct.pack("<5000H", *[(i * 7) % 300 for i in range(5000)]))' > big_vocab.bin
expect_error "token ids beyond the vocabulary" "vocab_size >= 300" --data big_vocab.bin

mpiexec -n 1 "$tsp" train "${common[@]}" --steps 4 --data corpus.txt --save ck > /dev/null
sed 's/"hidden_size": *64/"hidden_size": 128/' ck/config.json > wider.json
grep -q '"hidden_size": *128' wider.json || fail "could not derive another config"
expect_error "checkpoint of another model" "hidden_size 64 there, 128 here" --data corpus.txt --resume ck --config wider.json
sed 's/"max_position_embeddings": *[0-9]*/"max_position_embeddings": 4096/' ck/config.json > longer.json
grep -q '"max_position_embeddings": *4096' longer.json || fail "could not derive a longer config"
expect_error "checkpoint of another max_position_embeddings" \
  "max_position_embeddings 512 there, 4096 here" --data corpus.txt --resume ck --config longer.json
expect_error "no checkpoint" "no checkpoint at nowhere" --data corpus.txt --resume nowhere
mkdir notes && echo "important" > notes/todo.txt
expect_error "--save over a foreign directory" "is not a tsp checkpoint" --data corpus.txt --save notes
[ -f notes/todo.txt ] || fail "the foreign directory was touched"
# A model directory whose config.json does not match its weights.
mkdir mismatch && cp ck/model.safetensors mismatch/
sed 's/"intermediate_size": *160/"intermediate_size": 96/' ck/config.json > mismatch/config.json
expect_error "model directory not matching its config" "config.json says intermediate_size=96" --data corpus.txt --model mismatch

# Numeric options that cannot mean anything are refused, naming the option (the default batch
# shape here: these runs fail before anything is read).
saved_common=("${common[@]}")
common=(--preset tiny --layout single --progress lines)
while IFS='|' read -r -u 3 args fragment; do
  # shellcheck disable=SC2086  # the arguments are split on purpose
  expect_error "$args" "$fragment" --data corpus.txt $args
done 3<< 'EOF'
--steps 0|--steps must be at least 1, got 0
--stop-at -5|--stop-at must be a step count >= 1 (or -1: run to --steps), got -5
--stop-at 0|--stop-at must be a step count >= 1
--batch 0|--batch must be at least 1 row, got 0
--seq 0|--seq must be at least 1 token, got 0
--accum -1|--accum must be at least 1 micro-batch, got -1
--warmup -3|--warmup must be >= 0 steps
--tp 0|--tp must be at least 1, got 0
--dp -2|--dp must be at least 1, got -2
--zero 2|--zero must be 0 (every replica keeps the whole optimizer state) or 1
--zero -1|--zero must be 0
--lr 0|--lr must be a positive number, got 0
--lr nan|--lr must be a positive number, got nan
--lr -1e-3|--lr must be a positive number
--beta1 1|--beta1 must lie in [0, 1), got 1
--beta2 -0.5|--beta2 must lie in [0, 1), got -0.5
--eps 0|--eps must be a positive number
--wd -1|--wd must be >= 0
--clip nan|--clip must be >= 0
--min-lr-ratio 2|--min-lr-ratio must lie in [0, 1]
--val-every -1|--val-every must be >= 0 steps (0: never), got -1
--val-fraction 1|--val-fraction must lie in [0, 1)
--val-fraction -0.1|--val-fraction must lie in [0, 1)
--save-every -1 --save x|--save-every must be >= 0 steps (0: only at the end), got -1
--save-every 2|--save-every 2 needs --save DIR
--log-every 0|--log-every must be at least 1 step, got 0
EOF
# Sizes beyond what 64 bits or this machine can hold fail at once (they used to hang).
expect_error "--batch 2^62" "does not fit in 64 bits" --data corpus.txt --batch 4611686018427387904 --seq 1
expect_error "--batch beyond memory" "more than the" --data corpus.txt --batch 2000000 --seq 32
# A batch whose layer inputs fit but whose saved activations do not (about 3 KB per token here
# under selective, 0.5 KB of them layer inputs): the error says what full recomputation would need.
# (MemTotal in kB from awk, the arithmetic in bash: awk's integers may stop at 2^31.) One step and
# a time limit, so a machine where the check passed would fail here at once, not train for long.
mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
[ "${mem_kb:-0}" -gt 0 ] || fail "no MemTotal in /proc/meminfo"
expect_failure "--batch beyond memory under selective" "or --recompute full (" \
  timeout 60 "$tsp" train "${common[@]}" --data corpus.txt --steps 1 \
  --batch $((mem_kb * 1024 / 1500 / 32)) --seq 32
sed 's/"intermediate_size": *[0-9]*/"intermediate_size": 40000000000/' ck/config.json > huge.json
expect_error "a model beyond memory" "the model state (weights, gradients, AdamW moments)" \
  --data corpus.txt --config huge.json --batch 2 --seq 32
common=("${saved_common[@]}")

# Divergence: a huge learning rate without clipping gives a non-finite gradient within a few
# steps; training stops with exit code 2 and the checkpoint of the last good step stays.
if mpiexec -n 1 "$tsp" train "${common[@]}" --data corpus.txt --steps 20 --lr 1e4 --clip 0 \
  --save div --save-every 1 > div.out 2> div.err; then
  fail "a diverging run succeeded"
fi
grep -q "training stopped at step" div.err || { cat div.err; fail "no divergence message"; }
step=$(sed -n 's/.*training stopped at step \([0-9]*\).*/\1/p' div.err)
grep -q "\"step\": $((step - 1))" div/trainer_state.json || fail "the last good checkpoint is not step $((step - 1))"
echo "ok: divergence at step $step stopped with the step-$((step - 1)) checkpoint kept"
echo "PASS"
