"""A quantized block's tensors under checkpoint names, and the block a checkpoint reader builds from them.

The part: every quantized linear's `.weight` replaced by its GPTQ v1 tensors (`qweight`, `qzeros`, `scales`,
`g_idx`); every other tensor as in the source. Readers dequantize the packed tensors, so the worker does too.
"""

from __future__ import annotations

import torch
from torch import nn

from rayquant.solver.pack import PACKED_FIELDS, PackedLinear, dequantize_packed, packed_bits


def packed_part(source: dict[str, torch.Tensor], prefix: str,
                packed: dict[str, PackedLinear]) -> dict[str, torch.Tensor]:
    """The block's source tensors (full names under `prefix`) with each linear in `packed` (names relative to
    the block) in place of its `.weight`."""
    part = {}
    for name, tensor in source.items():
        rel = name[len(prefix):]
        lin = rel.removesuffix(".weight")
        if rel.endswith(".weight") and lin in packed:
            for f in PACKED_FIELDS:
                part[f"{prefix}{lin}.{f}"] = getattr(packed[lin], f)
        else:
            part[name] = tensor
    return part


def dequantized_state(part: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The block's state dict (names relative to it) with each packed linear dequantized, as a reader sees it."""
    state = {}
    for name, tensor in part.items():
        rel = name[len(prefix):]
        stem, _, suffix = rel.rpartition(".")
        if suffix in PACKED_FIELDS:
            if suffix == "qweight":
                p = PackedLinear(**{f: part[f"{prefix}{stem}.{f}"] for f in PACKED_FIELDS})
                state[f"{stem}.weight"] = dequantize_packed(p, packed_bits(p))  # overrides may differ per layer
        else:
            state[rel] = tensor
    return state


def install(linear: nn.Linear, packed: PackedLinear, bits: int, dtype: torch.dtype) -> None:
    """Replace a linear's weight by its dequantized codes, exactly as a checkpoint reader sees them."""
    w = dequantize_packed(packed, bits).to(device=linear.weight.device, dtype=dtype)
    linear.weight = nn.Parameter(w, requires_grad=False)
