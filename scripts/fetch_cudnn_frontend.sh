#!/usr/bin/env bash
# Fetches the cuDNN frontend's headers (a header-only C++ library; NVIDIA ships it in the PyPI wheel
# nvidia-cudnn-frontend, whose include/ holds cudnn_frontend.h) for the CUDA build's opt-in cuDNN
# attention path (src/backend/cuda/attention_cudnn.cpp). CMake runs this at configure time when
# the folder is missing (TSP_WITH_CUDNN=AUTO or ON in a CUDA build); once it exists nothing is
# downloaded again.
#   scripts/fetch_cudnn_frontend.sh VERSION DEST    -> DEST/include/cudnn_frontend.h
# The wheel's headers do not depend on its Python tag: any one wheel of VERSION serves.
set -euo pipefail
version="$1"
dest="$2"
[ -f "$dest/include/cudnn_frontend.h" ] && exit 0
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
  --implementation cp --abi cp311 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 -d "$tmp" "nvidia-cudnn-frontend==$version" >&2 ||
  { echo "fetch_cudnn_frontend: pip download nvidia-cudnn-frontend==$version failed" >&2; exit 1; }
wheel="$(ls "$tmp"/nvidia_cudnn_frontend-*.whl | head -1)"
# The headers only (python's zipfile: no unzip needed).
python3 - "$wheel" "$tmp/x" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith('include/')])
PY
[ -f "$tmp/x/include/cudnn_frontend.h" ] ||
  { echo "fetch_cudnn_frontend: $wheel has no include/cudnn_frontend.h" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
mv "$tmp/x" "$dest.partial"
mv "$dest.partial" "$dest"  # complete or absent: a failed fetch leaves no half folder
echo "fetch_cudnn_frontend: cuDNN frontend $version headers in $dest/include" >&2
