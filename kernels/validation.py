"""Validation of a packed layer: the dequant-GEMM on the packed tensors against the solver's weights.

Run on held-out activations after packing; it catches a packing bug, a corrupted tensor, or a
kernel that disagrees with `dequant_gemm_reference`, before the layer is written to a checkpoint.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rayquant.kernels.dequant_gemm import dequant_gemm_reference
from rayquant.solver.pack import PackedLinear


class EmptyValidationInput(ValueError):
    """There are no activation rows to validate a packed layer on."""


class KernelMismatch(Exception):
    """The dequant-GEMM of the packed layer disagrees with the solver's dequantized weights."""


@dataclass(frozen=True)
class LayerValidation:
    max_rel_err: float   # max over tokens of ||y_kernel - y_expected|| / ||y_expected||
    mean_rel_err: float  # mean of the same over tokens


def validate_packed_layer(x: Tensor, packed: PackedLinear, bits: int, expected_weight: Tensor, tolerance: float,
                          gemm: Callable[[Tensor, PackedLinear, int], Tensor] = dequant_gemm_reference,
                          ) -> LayerValidation:
    """Compare gemm(x, packed) with x @ expected_weight.T per token; x [M, K], expected_weight [N, K].

    `gemm` is the kernel under test (default: the pure-torch reference).

    Raises:
        KernelMismatch: the max relative error over tokens exceeds tolerance, or is not finite.
        EmptyValidationInput: x has no rows.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise EmptyValidationInput(
            f"validation activations have shape {tuple(x.shape)}; a packed layer is validated on x [M, K] "
            "with M > 0: raise calibration.eval_samples")
    y = gemm(x, packed, bits).double()
    y_expected = x.double() @ expected_weight.double().T  # [M, N]
    # per-token error relative to that token's output norm; an all-zero token compares absolutely
    denom = torch.linalg.vector_norm(y_expected, dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    rel = torch.linalg.vector_norm(y - y_expected, dim=-1) / denom
    check = LayerValidation(max_rel_err=float(rel.max()), mean_rel_err=float(rel.mean()))
    if not check.max_rel_err <= tolerance:  # also catches NaN
        raise KernelMismatch(
            f"packed layer output differs from the solver's dequantized weights: max relative error "
            f"{check.max_rel_err:.3g} > tolerance {tolerance:.3g} (mean {check.mean_rel_err:.3g}; "
            f"{y.shape[0]} tokens, in_features={x.shape[-1]}, out_features={expected_weight.shape[0]}, "
            f"bits={bits}); the packed qweight/qzeros/scales/g_idx do not encode the solved weights or "
            "the kernel is wrong; raise the validation tolerance only if the kernel's float16 rounding "
            "alone exceeds it")
    return check
