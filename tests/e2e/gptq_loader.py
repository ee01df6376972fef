"""The independent loader: transformers' own GPTQ path (optimum + GPTQModel's torch kernel) on CPU.

`AutoModelForCausalLM.from_pretrained(dir, quantization_config=GPTQConfig(bits, backend="torch"))`
reads the checkpoint's own quantization_config and replaces every linear of the blocks with
GPTQModel's `TorchLinear`, which converts the v1 zero points (stored zero - 1) to its internal v2
form on load. Installed by .ci/install-test-deps.sh (gptqmodel 7.7.0 with --no-deps on torch 2.13 CPU).

Two things to know when comparing its logits with rayquant's own dequantized model:
- TorchLinear forms W = scales[g_idx] * (q - z) in the scales' dtype, float16, and only then casts
  to the activations' dtype: a reference whose dequantized weights are rounded to float16 gives the
  same logits to float32 rounding; an unrounded one differs by float16's ~5e-4 relative error.
- TorchLinear wraps its dequantization in torch.compile; on CPU the first forward would spend
  ~20 s compiling it with inductor. `torch.compiler.set_stance("force_eager")` around the forward
  runs the same function eagerly (same numbers, ~10 ms for the tiny model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

# GPTQModel sizes its CPU thread pool from this (default: half the cores, 1 on CI's 2 cores); it is
# read when gptqmodel is first imported, which the first GPTQ load does
CPU_WORKERS_ENV = {"GPTQMODEL_CPU_WORKERS": "2"}


def load_gptq_logits(checkpoint_dir: Path, input_ids: Tensor, bits: int) -> Tensor:
    """Logits [batch, seq, vocab] float32 of the GPTQ checkpoint as transformers loads it (CPU, float32 activations).

    Raises:
        ValueError: the checkpoint's quantization_config says another bit width than `bits`.
        RuntimeError: the load produced no GPTQ linear (the checkpoint was read as a plain model).
    """
    model = load_gptq_model(checkpoint_dir, bits)
    with torch.compiler.set_stance("force_eager"), torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def load_gptq_model(checkpoint_dir: Path, bits: int) -> torch.nn.Module:
    """The GPTQ checkpoint as transformers loads it (CPU, float32 activations); run it under force_eager.

    Raises:
        ValueError: the checkpoint's quantization_config says another bit width than `bits`.
        RuntimeError: the load produced no GPTQ linear (the checkpoint was read as a plain model).
    """
    from transformers import AutoModelForCausalLM, GPTQConfig

    checkpoint_dir = Path(checkpoint_dir)
    stored_bits = json.loads((checkpoint_dir / "config.json").read_text())["quantization_config"]["bits"]
    if stored_bits != bits:
        # transformers would silently use the checkpoint's value: a test must not believe otherwise
        raise ValueError(f"{checkpoint_dir} is a {stored_bits}-bit checkpoint, not {bits}-bit")
    for name, value in CPU_WORKERS_ENV.items():
        os.environ.setdefault(name, value)

    model = AutoModelForCausalLM.from_pretrained(
        checkpoint_dir,
        quantization_config=GPTQConfig(bits=bits, backend="torch"),
        dtype=torch.float32,
        device_map="cpu",
    ).eval()
    n_quantized = sum(1 for module in model.modules() if hasattr(module, "qweight"))
    if n_quantized == 0:
        raise RuntimeError(f"transformers loaded {checkpoint_dir} without any GPTQ linear")
    return model


def load_gptqmodel(checkpoint_dir: Path) -> torch.nn.Module:
    """The checkpoint as GPTQModel's own loader builds it (CPU, torch kernel), with float32 activations.

    Unlike transformers' GPTQ path (optimum: one bits / group_size for every block linear), GPTQModel
    reads quantization_config["dynamic"]: per-module bits and group sizes, and "-:" modules left as
    plain nn.Linear. Its TorchLinear accepts only half-precision at load; the loaded model is then
    cast to float32 (scales included: the dequantized weights are exact, not float16-rounded).
    """
    from gptqmodel import BACKEND, GPTQModel

    for name, value in CPU_WORKERS_ENV.items():
        os.environ.setdefault(name, value)
    return GPTQModel.load(str(checkpoint_dir), backend=BACKEND.TORCH, device="cpu",
                          dtype=torch.bfloat16).model.to(torch.float32).eval()


def gptqmodel_logits(model: torch.nn.Module, input_ids: Tensor) -> Tensor:
    with torch.compiler.set_stance("force_eager"), torch.no_grad():
        return model(input_ids=input_ids).logits.float()
