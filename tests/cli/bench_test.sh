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
