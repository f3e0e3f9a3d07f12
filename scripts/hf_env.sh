#!/usr/bin/env bash
# The Python environment of the Hugging Face round-trip test (tests/model/hf_roundtrip_test.sh):
# Debian's python3-torch (1.13.1, apt: far smaller than PyPI's torch with its CUDA libraries) and
# transformers with its PyPI dependencies pinned in scripts/hf_requirements.txt, in a virtual
# environment BUILD_DIR/hf-venv made with --system-site-packages so that it sees Debian's torch.
#
#   scripts/hf_env.sh [BUILD_DIR]      # prints the environment's python on stdout
#
# TSP_HF_VENV=DIR puts the environment in DIR instead, for build directories that share one
# (scripts/test.sh: the Release and sanitizer builds).
#
# Idempotent and quiet: when the environment matches the requirements (a stamp holds their hash)
# and imports, it only prints the path. Otherwise it installs what is missing (apt, as root or
# with sudo), recreates the environment and checks that a LlamaForCausalLM runs forward and
# backward. Any failure exits 1 naming the step, with the end of the log.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-${here}/build}"
mkdir -p "${build}"
build="$(cd "${build}" && pwd)"
venv="${TSP_HF_VENV:-${build}/hf-venv}"
mkdir -p "$(dirname "${venv}")"
req="${here}/scripts/hf_requirements.txt"
log="${venv}.log"
py=/usr/bin/python3  # Debian's interpreter: Debian's python3-torch is installed for it

fail() {
  echo "hf_env.sh: FAILED: $*" >&2
  if [[ -s "${log}" ]]; then
    echo "hf_env.sh: last lines of ${log}:" >&2
    tail -n 25 "${log}" >&2
  fi
  exit 1
}

# One set-up at a time (two test runs sharing a build directory wait for each other).
exec 9>"${venv}.lock"
flock 9

want="$(sha256sum "${req}" | cut -d' ' -f1)"
if [[ -f "${venv}/.tsp-stamp" && "$(cat "${venv}/.tsp-stamp")" == "${want}" ]] &&
  "${venv}/bin/python" -c 'import torch, transformers' 2>/dev/null; then
  echo "${venv}/bin/python"
  exit 0
fi

: >"${log}"
need=()
for p in python3-torch python3-venv python3-numpy; do
  dpkg-query -W -f='${Status}' "${p}" 2>/dev/null | grep -q "install ok installed" || need+=("${p}")
done
if [[ ${#need[@]} -gt 0 ]]; then
  echo "hf_env.sh: installing ${need[*]} (Debian) for the Hugging Face round trip" >&2
  sudo_cmd=""
  [[ "$(id -u)" != 0 ]] && sudo_cmd="sudo"
  ${sudo_cmd} apt-get update -qq >>"${log}" 2>&1 || fail "apt-get update"
  DEBIAN_FRONTEND=noninteractive ${sudo_cmd} apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=600 "${need[@]}" >>"${log}" 2>&1 ||
    fail "apt-get install ${need[*]}"
fi
"${py}" -c 'import torch' >>"${log}" 2>&1 || fail "Debian's torch does not import in ${py}"

echo "hf_env.sh: creating ${venv} (transformers from PyPI, pinned in ${req})" >&2
rm -rf "${venv}"
"${py}" -m venv --system-site-packages "${venv}" >>"${log}" 2>&1 ||
  fail "${py} -m venv --system-site-packages ${venv} (is python3-venv installed?)"
"${venv}/bin/pip" install --disable-pip-version-check --no-input -q -r "${req}" >>"${log}" 2>&1 ||
  fail "pip install -r ${req} (is PyPI reachable?)"
"${venv}/bin/python" - >>"${log}" 2>&1 <<'PY' || fail "transformers' LlamaForCausalLM does not run with Debian's torch"
import torch, transformers
from transformers import LlamaConfig, LlamaForCausalLM
print("torch", torch.__version__, "transformers", transformers.__version__)
m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                 num_hidden_layers=1, vocab_size=32))
x = torch.zeros(1, 4, dtype=torch.long)
m(x, labels=x).loss.backward()
PY
echo "${want}" >"${venv}/.tsp-stamp"
echo "${venv}/bin/python"
