#!/usr/bin/python3
"""Peak memory per rank against sequence length, one line per layout, from `tsp bench --json`.

  mpiexec -n 4 tsp bench --config cfg.json --seq 256,512,1024 --json > bench.jsonl
  /usr/bin/python3 scripts/plot_memory.py bench.jsonl docs/memory_vs_seq.png [--predicted]

Reads the JSON lines (other lines, e.g. mpiexec noise, are ignored), plots peak_mb (the largest
rank's peak) per layout; --predicted adds the local model's prediction (src/plan/measure.cpp) as
dashed lines of the same colour. Uses Debian's python3-matplotlib (run with /usr/bin/python3).
"""
import argparse
import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("status") == "ok":
                rows.append(r)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("jsonl", help="output of tsp bench --json")
    ap.add_argument("png", help="image to write")
    ap.add_argument("--predicted", action="store_true", help="also plot the predicted peak")
    ap.add_argument("--title", default=None)
    a = ap.parse_args()
    rows = load(a.jsonl)
    if not rows:
        sys.exit(f"plot_memory.py: no successful rows in {a.jsonl} (was it made with --json?)")

    series = defaultdict(list)
    for r in rows:
        series[(r["layout"], r.get("degrees", ""))].append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (layout, degrees), rs in sorted(series.items()):
        rs.sort(key=lambda r: r["S"])
        xs = [r["S"] for r in rs]
        line, = ax.plot(xs, [r["peak_mb"] for r in rs], marker="o", label=f"{layout} {degrees}")
        if a.predicted and all("predicted_mb" in r for r in rs):
            ax.plot(xs, [r["predicted_mb"]["total"] for r in rs], linestyle="--",
                    color=line.get_color(), linewidth=1)
    m = rows[0]["model"]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length S (tokens)")
    ax.set_ylabel("peak memory per rank (MB)")
    ax.set_title(a.title or (f"tsp bench, {rows[0]['world']} ranks, h={m['h']} L={m['L']} "
                             f"heads={m['heads']}/{m['kv_heads']} ffn={m['ffn']} V={m['vocab']}, fp32"
                             + (" (dashed: predicted)" if a.predicted else "")),
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.png, dpi=120)
    print(f"wrote {a.png} ({len(rows)} rows, {len(series)} layouts)")


if __name__ == "__main__":
    main()
