#!/usr/bin/env bash
# One Llama block forward + backward, fp32, at the same shapes and thread count: PyTorch (CPU,
# Debian's python3-torch) next to tsp (bench_block, one rank), and the ratio of tokens/s
# (= ratio of GFLOP/s: both count FLOPs with the same formula, see bench/block.cpp).
#
#   scripts/bench_vs_torch.sh [BUILD_DIR] [--threads 2] [--repeats 5]
#
# Shapes (issue 6 §5): h=1024, 16 heads, FFN 2816, S=1024 (target >= 1.5x PyTorch) and h=256,
# 4 heads, FFN 688, S=8192 (target >= 3x; eager PyTorch's attention builds the S x S scores).
# PyTorch is installed here, with apt, only when missing: it is for this comparison only, the
# project never depends on it (scripts/setup.sh does not install it).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
build="${here}/build"
if [[ $# -gt 0 && "$1" != --* ]]; then build="$1"; shift; fi
threads=2
repeats=5
while [[ $# -gt 0 ]]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --repeats) repeats="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "bench_vs_torch.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done

bench="${build}/bench/bench_block"
if [[ ! -x "${bench}" ]]; then
  echo "bench_vs_torch.sh: ${bench} not found; build it with" >&2
  echo "  cmake -S ${here} -B ${build} && cmake --build ${build} --target bench_block" >&2
  exit 1
fi

py=/usr/bin/python3  # Debian's Python packages are only visible to Debian's interpreter
# Debian's torch does its GEMMs through the libblas.so.3 alternative. Without OpenBLAS that is the
# netlib reference BLAS (measured 6 GFLOP/s at 1024^3 here, against 150 with OpenBLAS), which would
# make the comparison meaningless: give PyTorch the fast BLAS a user would have.
need=()
"${py}" -c 'import torch' 2>/dev/null || need+=(python3-torch)
dpkg-query -W -f='${Status}' libopenblas0-pthread 2>/dev/null | grep -q "install ok installed" ||
  need+=(libopenblas0-pthread)
if [[ ${#need[@]} -gt 0 ]]; then
  echo "# installing ${need[*]} (Debian) for this benchmark only" >&2
  sudo_cmd=""
  [[ "$(id -u)" != 0 ]] && sudo_cmd="sudo"
  ${sudo_cmd} apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=600 \
    "${need[@]}" >&2
fi
blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || echo unknown)
echo "# PyTorch's BLAS (libblas.so.3 alternative): ${blas}"

export OMP_NUM_THREADS="${threads}"  # our GEMMs read compute threads from --threads as well
echo "# bench_vs_torch  machine=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" \
  " cores=$(nproc)  threads=${threads}  repeats=${repeats}  dtype=f32  pass=forward+backward"
printf '# %-5s %5s %4s %5s %6s %12s %12s %12s %12s %7s %7s\n' \
  shape h nh ffn seq torch_GF/s tsp_GF/s torch_tok/s tsp_tok/s ratio target
shapes=("1024 16 2816 1024 1.5" "256 4 688 8192 3.0")
i=0
for s in "${shapes[@]}"; do
  read -r h nh ffn seq target <<<"${s}"
  args=(--h "${h}" --heads "${nh}" --ffn "${ffn}" --seq "${seq}" --threads "${threads}"
        --repeats "${repeats}" --json)
  t=$("${py}" "${here}/bench/torch_block.py" "${args[@]}")
  o=$("${bench}" "${args[@]}" --dtype fp32)  # torch_block.py runs fp32
  echo "${t}" >&2
  echo "${o}" >&2
  "${py}" - "${t}" "${o}" "${i}" "${h}" "${nh}" "${ffn}" "${seq}" "${target}" <<'EOF'
import json, sys
t, o = json.loads(sys.argv[1]), json.loads(sys.argv[2])
i, h, nh, ffn, seq, target = sys.argv[3:9]
ratio = o["tokens_per_s"] / t["tokens_per_s"]
ok = "" if (t["finite"] and o["finite"]) else "  (non-finite result!)"
print(f"  {i:<5} {h:>5} {nh:>4} {ffn:>5} {seq:>6} {t['gflops']:>12.2f} {o['gflops']:>12.2f} "
      f"{t['tokens_per_s']:>12.1f} {o['tokens_per_s']:>12.1f} {ratio:>6.2f}x {float(target):>6.1f}x{ok}")
EOF
  i=$((i + 1))
done
