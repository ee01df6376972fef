"""Dequant-GEMM of GPTQ v1 packed weights: y = x @ dequantize(qweight, qzeros, scales, g_idx)ᵀ.

`dequant_gemm_reference` is the pure-torch definition every fused kernel (Triton w4a16 / w8a16 in
`triton_dequant_gemm`) must reproduce; kernels take the same arguments, so `validate_packed_layer` can
run either. `dequant_gemm` picks the kernel where one exists and the reference elsewhere.
"""

import torch
from torch import Tensor

from rayquant.solver.pack import PackedLinear, dequantize_packed


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
    W = dequantize_packed(packed, bits)  # [N, K] float32
    dtype = torch.promote_types(x.dtype, torch.float32)
    return (x.to(dtype) @ W.to(dtype).T).to(x.dtype)


class TritonUnavailable(ImportError):
    """CUDA activations need the Triton kernel, but triton is not installed."""


def dequant_gemm(x: Tensor, packed: PackedLinear, bits: int) -> Tensor:
    """x [M, K] @ W.T -> [M, N] in x's dtype: the Triton kernel for CUDA float16/bfloat16 x at 4 or 8 bits,
    the reference otherwise (CPU, 2/3 bits, float32/float64 x, which the kernel would round to 16 bits).

    Raises:
        GemmShapeMismatch: x's last dimension is not the layer's in_features.
        TritonUnavailable: x is on CUDA but triton cannot be imported.
    """
    if not (x.is_cuda and bits in (4, 8) and x.dtype in (torch.float16, torch.bfloat16)):
        return dequant_gemm_reference(x, packed, bits)
    try:
        from rayquant.kernels.triton_dequant_gemm import dequant_gemm_triton
    except ImportError as err:
        raise TritonUnavailable(
            f"CUDA activations at {bits} bits run the Triton dequant-GEMM, but triton cannot be imported "
            f"({err}): install triton (the CUDA builds of torch depend on it) or move x to the CPU") from err
    return dequant_gemm_triton(x, packed, bits)
