"""A quantized block's tensors under checkpoint names, and the block a checkpoint reader builds from them.

The part: every quantized linear's `.weight` replaced by its GPTQ v1 tensors (`qweight`, `qzeros`, `scales`,
`g_idx`); every other tensor as in the source. Readers dequantize the packed tensors, so the worker does too.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from rayquant.solver.pack import PACKED_FIELDS, PackedLinear, concat_packed, dequantize_packed, packed_bits

# float32 bytes of weights dequantized in one call: an MoE stage's experts in a few calls, not hundreds
DEQUANTIZE_CHUNK_BYTES = 1 << 30


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


def packed_linears(part: dict[str, torch.Tensor], prefix: str) -> set[str]:
    """The linears (names relative to the block under `prefix`) a part holds packed."""
    return {name[len(prefix):].removesuffix(".qweight") for name in part if name.endswith(".qweight")}


def release_source_weights(source: dict[str, torch.Tensor], prefix: str, linears: Iterable[str]) -> None:
    """Free each linear's source `.weight` once its quantized copy is installed in the block: a meta tensor of
    the same shape keeps its name (and packed_part's order), so the block's weights are held once, not twice,
    by its later stages (an MoE block's experts: 22.5 GB at DeepSeek-V3). Where the block's weight is the
    source tensor itself (a GPU worker in the source's dtype) `install` wrote into it and this only drops the
    name's reference; a CPU worker's float32 block frees the source's bfloat16 tensors here."""
    for lin in linears:
        name = f"{prefix}{lin}.weight"
        source[name] = torch.empty_like(source[name], device="meta")


def dequantized_state(part: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The block's state dict (names relative to it) with each packed linear dequantized, as a reader sees it."""
    state, stems = {}, []
    for name, tensor in part.items():
        rel = name[len(prefix):]
        stem, _, suffix = rel.rpartition(".")
        if suffix == "qweight":
            stems.append(stem)
        elif suffix not in PACKED_FIELDS:
            state[rel] = tensor
    layers = [PackedLinear(**{f: part[f"{prefix}{stem}.{f}"] for f in PACKED_FIELDS}) for stem in stems]
    for stem, weight in zip(stems, dequantize_packed_many(layers)):
        state[f"{stem}.weight"] = weight
    return state


def dequantize_packed_many(layers: list[PackedLinear]) -> list[torch.Tensor]:
    """dequantize_packed of every layer (each at its own bits: overrides may differ per layer), bitwise:
    layers of one bit width, in_features, device and g_idx (every expert of an MoE stage) are joined along
    the output dim and dequantized in one call per DEQUANTIZE_CHUNK_BYTES, then split."""
    out: list[torch.Tensor | None] = [None] * len(layers)
    joinable: dict[tuple, list[int]] = {}
    for i, p in enumerate(layers):
        key = (packed_bits(p), p.g_idx.numel(), p.qweight.device)
        joinable.setdefault(key, []).append(i)
    for (bits, K, _), members in joinable.items():
        chunks: list[list[int]] = []
        size = 0
        for i in members:
            nbytes = 4 * K * layers[i].scales.shape[1]
            if not chunks or size + nbytes > DEQUANTIZE_CHUNK_BYTES or not torch.equal(
                    layers[i].g_idx, layers[chunks[-1][0]].g_idx):
                chunks.append([])
                size = 0
            chunks[-1].append(i)
            size += nbytes
        for chunk in chunks:
            if len(chunk) == 1:
                out[chunk[0]] = dequantize_packed(layers[chunk[0]], bits)
                continue
            joined = dequantize_packed(concat_packed([layers[i] for i in chunk]), bits)
            for i, w in zip(chunk, joined.split([layers[i].scales.shape[1] for i in chunk])):
                out[i] = w
    return out


def install(linears: list[nn.Linear], packed: list[PackedLinear], dtype: torch.dtype) -> None:
    """Write each linear's dequantized codes over its weight, exactly as a checkpoint reader sees them: in place
    (an expert's weight is a row of its experts' stacked weights, `expert_padding.stack_expert_weights`), or a
    new tensor where the weight is of another dtype."""
    for linear, w in zip(linears, dequantize_packed_many(packed), strict=True):
        w = w.to(device=linear.weight.device, dtype=dtype)
        if linear.weight.dtype == w.dtype and linear.weight.shape == w.shape:
            linear.weight.data.copy_(w)
        else:
            linear.weight = nn.Parameter(w, requires_grad=False)
