#!/usr/bin/env bash
# Gradient accumulation with packed documents is the exact token mean of the optimizer step:
# `tsp train --doc-sep ID --accum K` with micro-batches of B rows equals --accum 1 with batches of
# K·B rows (the same rows: window n = (step·accum + micro)·B + row), losses and saved weights, to
# fp32 rounding; under single, tsp at 2 ranks and data parallelism. A checkpoint of such a run
# resumes bit for bit. (The micro-batches count different numbers of labels, those after a
# separator being ignored, so averaging their means would weigh their tokens differently.) The
# validation loss is the token mean of the held-out windows too: 8 windows in 2 batches of 4 give
# the loss of 1 batch of 8.
# Usage: bash train_accum_documents_test.sh <build-dir> <source-dir>
source "$(dirname "$0")/../shell_common.sh"
cd "$tmp"

write_verses 1500 corpus.txt
cat > config.json << 'JSON'
{"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8, "num_key_value_heads": 8,
 "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 256}
JSON
# The separator is the space (byte 32): about one token in six, so a row of 32 holds several short
# documents and the labels a micro-batch of 4 rows counts vary by several between micro-batches.
common=(--dtype fp32 --data corpus.txt --config config.json --seq 32 --steps 8 --warmup 2
  --lr 3e-3 --val-every 4 --val-windows 8 --progress lines --log-every 100 --doc-sep 32)
train() {  # ranks, extra args...
  local n=$1
  shift
  mpiexec -n "$n" "$tsp" train "${common[@]}" "$@" > /dev/null
}
# Losses: the two runs compute the same function in another summation order (two micro-batch
# GEMMs added into the gradient instead of one over both, the loss sums divided before they are
# added), fp32 throughout; the argument and bound of train_layouts_test.sh hold (measured ~4e-8).
# The mean of the micro-batches' means is off by (m1 - m2)(n2 - n1)/(2(n1 + n2)) at the first
# step already (n_i the labels micro-batch i counts, m_i its mean: ~1e-3 here), then the
# trajectories part.
compare() {  # reference metrics, metrics, label
  compare_metric "$1" "$2" "$3" 2e-5
}
# Weights after 8 steps, norm-wise per tensor. The gradients differ by summation order only (the
# layout harness's kLayoutRtol = 1e-4 bounds that, tests/parallel/layout_harness.h); AdamW's
# update m/(sqrt(v) + eps) is invariant to the gradient's scale, so each step's update differs
# by about that relative amount, and the weights, which moved by at most Σ lr_t (< 2.4e-2 per
# element) from an init of the same order, by no more (measured <= 2.2e-6). Weighing the
# micro-batches' tokens differently changes the gradients by ~1e-2 and the weights by far more.
compare_weights() {  # checkpoint, reference checkpoint, label
  "$tsp" compare "$1/model.safetensors" "$2/model.safetensors" --rtol 1e-4 > cmp.txt ||
    { cat cmp.txt; fail "$3: saved weights differ from --accum 1 with the batch doubled"; }
  echo "$3: saved weights $(tail -1 cmp.txt | sed 's/^# //')"
}

train 1 --batch 8 --metrics ref.jsonl --save ck_ref
[ "$(metric ref.jsonl | wc -l)" -eq 8 ] || fail "reference: expected 8 metrics lines"

train 1 --batch 4 --accum 2 --metrics single_a2.jsonl --save ck_single_a2
compare ref.jsonl single_a2.jsonl "single --accum 2"
compare_weights ck_single_a2 ck_ref "single --accum 2"
# Validation at steps 4 and 8, same weights to the bound above: the same bound for the losses.
[ "$(metric ref.jsonl val_loss | wc -l)" -eq 2 ] || fail "reference: expected 2 validation losses"
compare_metric ref.jsonl single_a2.jsonl "validation, batches of 4 vs 8" 2e-5 val_loss
train 1 --batch 2 --accum 4 --metrics single_a4.jsonl
compare ref.jsonl single_a4.jsonl "single --accum 4"
train 2 --layout tsp --batch 4 --accum 2 --metrics tsp_a2.jsonl --save ck_tsp_a2
compare ref.jsonl tsp_a2.jsonl "tsp D=2 --accum 2"
compare_weights ck_tsp_a2 ck_ref "tsp D=2 --accum 2"
# Replicas: the count of a micro-batch sums both replicas' rows.
train 2 --layout single --dp 2 --batch 4 --accum 2 --metrics dp2_a2.jsonl
compare ref.jsonl dp2_a2.jsonl "single --dp 2 --accum 2"

# Resuming: the step's count is taken from its micro-batches again, so the arithmetic is the
# uninterrupted run's and the losses of steps 5-8 are the same digits.
train 2 --layout tsp --batch 4 --accum 2 --stop-at 4 --save ck_tsp_half
train 2 --layout tsp --resume ck_tsp_half --metrics tsp_resumed.jsonl
diff <(metric tsp_a2.jsonl | tail -n +5) <(metric tsp_resumed.jsonl) > /dev/null ||
  fail "tsp --accum 2 with documents: resuming at step 4 changed the losses of steps 5-8"
echo "resume tsp --accum 2 at step 4        bit-exact"
echo "PASS"
