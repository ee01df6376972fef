"""fp32 matrix products on the tensor cores, from operands split into a high and a low part.

An fp32 GEMM runs on the CUDA cores (~50 TFLOP/s on an H100); the tensor cores take TF32 (10 explicit
mantissa bits) at ~8× that rate, or bf16 (7 bits) at ~16×. With A = Ah + Al and B = Bh + Bl, the three
products Ah Bh + Al Bh + Ah Bl miss only Al Bl and the rounding of the low parts:
- "tf32x3": Ah = A with its 13 low mantissa bits cleared (exactly TF32), Al = A - Ah (exact in fp32, then
  read as TF32 by the tensor cores): ~2⁻²¹ relative per element, the class of an fp32 product (2⁻²⁴);
- "bf16x3": Ah = bf16(A), Al = bf16(A - Ah): ~2⁻¹⁶ relative.
The three products run as one GEMM with a three times longer inner dimension ([Ah | Al | Ah] @
[Bh; Bh; Bl]), so the epilogue adds `out` once, in IEEE fp32.
"""

from contextlib import contextmanager

import torch
from torch import Tensor

PRECISIONS = ("fp32", "tf32x3", "bf16x3")
TF32_LOW_BITS = -(1 << 13)  # int32 mask 0xFFFFE000: keeps sign, exponent and TF32's 10 mantissa bits


def addmm_split_(out: Tensor, A: Tensor, B: Tensor, precision: str = "tf32x3", alpha: float = 1.0) -> Tensor:
    """out += alpha · A @ B in place for fp32 CUDA tensors, in `precision` (see the module docstring); fp64
    and CPU tensors, and precision "fp32", take the plain product. 3-D operands [E, ·, ·]: a batch of
    products (one batch element: the plain 2-D product)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if out.dim() == 3 and out.shape[0] == 1:
        addmm_split_(out[0], A[0], B[0], precision, alpha)
        return out
    batched = out.dim() == 3
    if precision == "fp32" or not out.is_cuda or out.dtype != torch.float32:
        return out.baddbmm_(A, B, alpha=alpha) if batched else out.addmm_(A, B, alpha=alpha)
    if precision == "tf32x3":
        Ah, Al = _split_tf32(A)
        Bh, Bl = _split_tf32(B)
        with _tf32_matmul():
            A3, B3 = torch.cat([Ah, Al, Ah], dim=-1), torch.cat([Bh, Bh, Bl], dim=-2)
            return out.baddbmm_(A3, B3, alpha=alpha) if batched else out.addmm_(A3, B3, alpha=alpha)
    if batched:  # bf16 products with an fp32 output: one 2-D product per batch element
        for e in range(out.shape[0]):
            addmm_split_(out[e], A[e], B[e], precision, alpha)
        return out
    Ah, Al = split_bf16(A)
    Bh, Bl = split_bf16(B)
    return torch.addmm(out, torch.cat([Ah, Al, Ah], dim=1), torch.cat([Bh, Bh, Bl], dim=0),
                       out_dtype=torch.float32, alpha=alpha, out=out)


def _split_tf32(x: Tensor) -> tuple[Tensor, Tensor]:
    high = (x.contiguous().view(torch.int32) & TF32_LOW_BITS).view(torch.float32)
    return high, x - high


def split_bf16(x: Tensor) -> tuple[Tensor, Tensor]:
    """x ≈ high + low in bf16 (fp32 x; ~2⁻¹⁶ relative)."""
    high = x.bfloat16()
    return high, (x - high.float()).bfloat16()


@contextmanager
def _tf32_matmul():
    """cuBLAS may use TF32 inside the block (the flag is process-wide: restored on exit)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
