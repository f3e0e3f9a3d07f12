#!/usr/bin/env bash
# `tsp bench` end to end at 2 ranks on a tiny random model: every layout that divides gives a row
# whose loss matches single (dloss column), and a sequence length the model cannot take is a
# "skipped" row for every layout — never a hang (single runs on rank 0 alone, so an error there
# must not leave the other ranks waiting).
# Usage: bash bench_test.sh <build-dir> <source-dir>
source "$(dirname "$0")/../shell_common.sh"

"$tsp" init --preset tiny --seed 1 --out "$tmp/model" >/dev/null  # max_position_embeddings 512
timeout 120 mpiexec -n 2 "$tsp" bench --model "$tmp/model" --layouts single,tp,sp,tsp,fsdp-cp \
  --seq 64,1024 --repeats 1 --json >"$tmp/rows.jsonl" || fail "tsp bench failed or hung (rc=$?)"

/usr/bin/python3 - "$tmp/rows.jsonl" <<'PY' || exit 1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {(r["layout"], r["S"]): r for r in rows}
def fail(msg):
    print("FAIL:", msg, file=sys.stderr); sys.exit(1)
for name in ["single", "tp", "sp", "tsp", "fsdp-cp"]:
    ok = by.get((name, 64))
    if not ok or ok.get("status") != "ok":
        fail(f"{name} at S=64 did not run: {ok}")
    if name != "single" and abs(ok["loss_diff"]) > 1e-5:
        fail(f"{name} loss differs from single by {ok['loss_diff']}")
    if ok["peak_mb"] <= 0:
        fail(f"{name} reports no peak memory")
    big = by.get((name, 1024))
    if not big or "max_position_embeddings" not in big.get("status", ""):
        fail(f"{name} at S=1024 should be skipped for max_position_embeddings: {big}")
print(f"bench_test: {len(rows)} rows OK")
PY

# --mem-limit: the longest sequence within a memory cap, predicted by the model of our allocations
# and measured by real steps, for tsp and tp under the three recomputation modes. The model is
# exact at these shapes (tests/plan/measured_vs_predicted_mpi_test.cpp), so the two must agree, the
# measured peak at that S must be within the cap, and the next S tried must exceed it; the more a
# mode recomputes, the longer the sequence it trains (none <= selective <= full).
cat >"$tmp/cfg.json" <<'JSON'
{"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
 "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 8192}
JSON
timeout 120 mpiexec -n 2 "$tsp" bench --config "$tmp/cfg.json" --layouts tsp,tp --dtype fp32 \
  --recompute none,selective,full --mem-limit 4 --seq-step 128 --json >"$tmp/longest.jsonl" ||
  fail "tsp bench --mem-limit failed or hung (rc=$?)"
/usr/bin/python3 - "$tmp/longest.jsonl" <<'PY' || exit 1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def fail(msg):
    print("FAIL:", msg, file=sys.stderr); sys.exit(1)
if len(rows) != 6: fail(f"expected 6 rows (2 layouts x 3 modes), got {len(rows)}")
best = {}
for r in rows:
    if r["status"] != "ok": fail(f"{r['layout']} {r['recompute']}: {r['status']}")
    if r["measured_max_seq"] != r["predicted_max_seq"]:
        fail(f"{r['layout']} {r['recompute']}: measured {r['measured_max_seq']} != predicted {r['predicted_max_seq']}")
    if r["measured_mb"] > 4: fail(f"{r}: the measured peak exceeds the cap")
    if "above" not in r or r["above"]["measured_mb"] <= 4: fail(f"{r}: the next S should exceed the cap")
    best[(r["layout"], r["recompute"])] = r["measured_max_seq"]
for layout in ["tsp", "tp"]:
    if not best[(layout, "none")] <= best[(layout, "selective")] <= best[(layout, "full")]:
        fail(f"{layout}: the longest sequences are not ordered none <= selective <= full")
print("bench_test --mem-limit:", {f"{k[0]} {k[1]}": v for k, v in best.items()})
PY
