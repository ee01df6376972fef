"""Dequant-GEMM of GPTQ v1 packed weights: y = x @ dequantize(qweight, qzeros, scales, g_idx)ᵀ.

`dequant_gemm_reference` is the pure-torch definition every fused kernel (Triton w4a16 / w8a16)
must reproduce; kernels take the same arguments, so `validate_packed_layer` can run either.
"""

import torch
from torch import Tensor

from rayquant.solver.grid import dequantize
from rayquant.solver.pack import PackedLinear, unpack_linear


class GemmShapeMismatch(ValueError):
    """The activations' last dimension is not the packed layer's in_features."""


def dequant_gemm_reference(x: Tensor, packed: PackedLinear, bits: int) -> Tensor:
    """x [M, K] @ W.T -> [M, N] in x's dtype, W [N, K] dequantized from the packed tensors.

    Computed in float32 (float64 for float64 x), rounded to x's dtype once at the end.

    Raises:
        GemmShapeMismatch: x's last dimension is not the layer's in_features.
    """
    in_features = packed.g_idx.numel()
    if x.shape[-1] != in_features:
        raise GemmShapeMismatch(
            f"activations of shape {tuple(x.shape)} do not fit a packed layer with in_features="
            f"{in_features}: pass x [M, {in_features}]")
    unpacked = unpack_linear(packed, bits)
    W = dequantize(unpacked.codes, unpacked.scales, unpacked.zeros, unpacked.g_idx)  # [N, K] float32
    dtype = torch.promote_types(x.dtype, torch.float32)
    return (x.to(dtype) @ W.to(dtype).T).to(x.dtype)
