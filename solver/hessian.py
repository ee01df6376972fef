"""The layer's quadratic objective: Hessian accumulation, normalisation, dead inputs, loss.

GPTQ (Frantar et al., 2022, Section 2 "Layer-wise quantization") minimises, per linear layer,
||W X - Q X||² = tr((W - Q) H (W - Q)ᵀ) with H = X Xᵀ over the calibration tokens. Here the
Hessian travels as the plain sum `hessian_sum` = Σ xᵀx (fp32) plus the token count, so partial
sums from several workers add up in a fixed order; it is normalised once, H = hessian_sum /
n_tokens, when a solve starts (the reference's factor 2 is dropped: it scales the loss only and
damping is relative to mean(diag(H))).

Dead inputs (diag(H) == 0, an input channel that is always zero) are handled as the reference
implementation does: H[i, i] = 1 and W[:, i] = 0, so H is invertible and the column quantizes to 0.
"""

import importlib.util

import torch
from torch import Tensor

from rayquant.solver.split_matmul import split_bf16


class InvalidSolverInput(ValueError):
    """Weights or Hessian of a solve have inconsistent shapes or an empty token count."""


class NonFiniteSolverInput(InvalidSolverInput):
    """Weights or Hessian of a solve contain NaN or Inf."""


def accumulate_hessian(hessian_sum: Tensor, x: Tensor, mirror: bool = True) -> int:
    """Add xᵀx of activations x [..., K] into hessian_sum [K, K] in place; return the tokens added.

    mirror=False leaves the blocks below the diagonal of the tensor-core path stale: a caller adding
    many micro-batches calls `mirror_upper` once after the last, instead of copying them every time.

    bf16/fp16 activations into an fp32 sum on CUDA multiply as they are, on the tensor cores with fp32
    accumulation (`_accumulate_on_tensor_cores`): their products are exact in fp32, so this is the fp32
    sum up to summation order, at the tensor cores' rate. Elsewhere x is cast to hessian_sum's dtype
    before the product (fp32, or fp64 where a caller wants sums independent of summation order).

    Raises:
        InvalidSolverInput: x's last dimension is not hessian_sum's size.
    """
    K = hessian_sum.shape[-1]
    if hessian_sum.dim() != 2 or hessian_sum.shape[0] != K or x.shape[-1] != K:
        raise InvalidSolverInput(
            f"cannot add activations of shape {tuple(x.shape)} to a Hessian sum of shape "
            f"{tuple(hessian_sum.shape)}: the activations' last dimension must be in_features={K}")
    rows = x.reshape(-1, K)
    if rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16) and hessian_sum.dtype == torch.float32:
        _accumulate_on_tensor_cores(hessian_sum, rows)
        if mirror:
            mirror_upper(hessian_sum)
    else:
        rows = rows.to(hessian_sum.dtype)
        hessian_sum.addmm_(rows.T, rows)
    return rows.shape[0]


# The tensor cores' fp32 accumulation is less exact than IEEE fp32 over long sums: each product of
# at most this many tokens is added into hessian_sum by the GEMM epilogue, in IEEE fp32.
TENSOR_CORE_TOKENS = 2048
# xᵀx is symmetric: only blocks of this width on and above the diagonal are multiplied, then mirrored.
HESSIAN_BLOCK = 4096
# "triton": one kernel over all of a call's tokens that adds its tensor-core sums into IEEE fp32 every 512
# tokens (solver/hessian_triton.py); "cublas": one addmm per block and TENSOR_CORE_TOKENS tokens, the
# fallback without triton. Measured on an H100 (solver_bench), one 70B block's Hessians: 0.56-0.60 s at
# 8e-7 from fp64 against cuBLAS's 0.72 s at 4.2e-6.
HESSIAN_KERNEL = "triton"


def _accumulate_on_tensor_cores(hessian_sum: Tensor, rows: Tensor) -> None:
    """hessian_sum [K, K] fp32 += rowsᵀ rows for bf16/fp16 rows [T, K] on CUDA, blocks on and above the
    diagonal only (mirror_upper completes it)."""
    if HESSIAN_KERNEL == "triton" and importlib.util.find_spec("triton") is not None:
        from rayquant.solver.hessian_triton import accumulate_upper_triton  # imports triton: CUDA only
        accumulate_upper_triton(hessian_sum, rows, HESSIAN_BLOCK)
        return
    K = rows.shape[1]
    starts = list(range(0, K, HESSIAN_BLOCK))
    for t in range(0, rows.shape[0], TENSOR_CORE_TOKENS):
        x = rows[t:t + TENSOR_CORE_TOKENS]
        for i, a in enumerate(starts):
            for b in starts[i:]:
                block = hessian_sum[a:a + HESSIAN_BLOCK, b:b + HESSIAN_BLOCK]
                torch.addmm(block, x[:, a:a + HESSIAN_BLOCK].T, x[:, b:b + HESSIAN_BLOCK],
                            out_dtype=torch.float32, out=block)


def mirror_upper(hessian_sum: Tensor) -> None:
    """Copy the blocks above the diagonal below it: what the tensor-core path skipped. Only on CUDA
    (elsewhere every product was full, and the sum is already complete)."""
    if not hessian_sum.is_cuda:
        return
    starts = list(range(0, hessian_sum.shape[0], HESSIAN_BLOCK))
    for i, a in enumerate(starts):
        for b in starts[i + 1:]:
            upper = hessian_sum[a:a + HESSIAN_BLOCK, b:b + HESSIAN_BLOCK]
            hessian_sum[b:b + HESSIAN_BLOCK, a:a + HESSIAN_BLOCK] = upper.T


def compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """float64 when the weight is float64 (exact comparisons), else float32 (production)."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def objective_hessians(hessians: list[tuple[Tensor, int]], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """H [E, K, K] = hessian_sum / n_tokens of each (hessian_sum, n_tokens) in `dtype`, a new tensor, dead
    inputs' diagonal set to 1; and the dead inputs [E, K] (bool)."""
    E, K = len(hessians), hessians[0][0].shape[0]
    H = torch.empty(E, K, K, dtype=dtype, device=hessians[0][0].device)
    for e, (hessian_sum, n_tokens) in enumerate(hessians):
        torch.div(hessian_sum.to(dtype), n_tokens, out=H[e])
    dead = torch.diagonal(H, dim1=1, dim2=2) == 0
    for e in range(E):
        H[e][dead[e], dead[e]] = 1.0
    return H, dead


def objective_weights(weights: list[list[Tensor]], dead: Tensor, dtype: torch.dtype) -> Tensor:
    """W [E, N, K]: weights[e] (each [N_i, K], ΣN_i = N) stacked in `dtype`, a new tensor, dead inputs'
    columns zeroed."""
    E, K = dead.shape
    W = torch.empty(E, sum(w.shape[0] for w in weights[0]), K, dtype=dtype, device=dead.device)
    for e, ws in enumerate(weights):
        row = 0
        for w in ws:
            W[e, row:row + w.shape[0]].copy_(w)
            row += w.shape[0]
        W[e][:, dead[e]] = 0.0
    return W


def check_layer_inputs(weight: Tensor, hessian_sum: Tensor, n_tokens: int, hessian_values: bool = True) -> None:
    """Raises InvalidSolverInput / NonFiniteSolverInput for inputs no solve can use (hessian_values=False:
    hessian_sum's values were checked already)."""
    if weight.dim() != 2 or hessian_sum.shape != (weight.shape[1], weight.shape[1]):
        raise InvalidSolverInput(
            f"weight {tuple(weight.shape)} and hessian_sum {tuple(hessian_sum.shape)} do not fit: "
            "expected weight [out_features, in_features] and hessian_sum [in_features, in_features]")
    if weight.device != hessian_sum.device:
        raise InvalidSolverInput(
            f"weight is on {weight.device} but hessian_sum on {hessian_sum.device}: the solver computes where "
            "its inputs are, so move both to the device that should run the solve")
    if n_tokens < 1:
        raise InvalidSolverInput(
            f"n_tokens={n_tokens}: the Hessian was accumulated over no calibration tokens; check that "
            "calibration.n_samples > 0 and the layer is reached by the forward pass")
    for name, t in (("weight", weight), ("hessian_sum", hessian_sum))[:2 if hessian_values else 1]:
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise NonFiniteSolverInput(
                f"{name} {tuple(t.shape)} has {bad} NaN/Inf entries; the source weights or the calibration "
                "activations overflowed: check the model files, and the model's dtype for the activations")


def layer_loss(W: Tensor, Q: Tensor, H: Tensor, parts: int = 3) -> float:
    """tr((W - Q) H (W - Q)ᵀ) for W, Q [N, K], H [K, K]: the layer's output error per token.

    On CUDA in fp32 the product runs on the tensor cores from `parts` bf16 products (see
    _mm_split_bf16): 3 (~1e-7 relative on the loss) for GPTQ's own loss, 1 (~1e-5) where a baseline
    is compared at percent level and the 2 extra products would cost 0.2 s per 70B block.
    """
    E = W - Q
    EH = _mm_split_bf16(E, H, parts) if E.is_cuda and E.dtype == torch.float32 else E @ H
    return float((EH * E).sum(dtype=torch.float64))


def _mm_split_bf16(A: Tensor, B: Tensor, parts: int = 3) -> Tensor:
    """A @ B for fp32 A [N, K], B [K, M] on CUDA from bf16 tensor-core products with fp32 accumulation.

    A = Ah + Al and B = Bh + Bl with bf16 parts; Ah Bh + Ah Bl + Al Bh misses only Al Bl (~2⁻¹⁶
    relative), close to an fp32 product at several times the speed of IEEE fp32 GEMM (a loss on a
    28672-wide Hessian: 0.12 s instead of 0.26 s on an H100, relative error 3e-5). B is split in
    row chunks so no second K×K fp32 matrix is ever allocated. parts < 3 keeps only the first products
    of (Ah Bh, Al Bh, Ah Bl).
    """
    Ah, Al = split_bf16(A) if parts > 1 else (A.bfloat16(), None)
    out = torch.zeros(A.shape[0], B.shape[1], dtype=torch.float32, device=A.device)
    for k in range(0, B.shape[0], SPLIT_CHUNK):
        Bc = B[k:k + SPLIT_CHUNK]
        Bh, Bl = split_bf16(Bc) if parts > 2 else (Bc.bfloat16(), None)
        for a, b in ((Ah, Bh), (Al, Bh), (Ah, Bl))[:parts]:
            torch.addmm(out, a[:, k:k + SPLIT_CHUNK], b, out_dtype=torch.float32, out=out)
    return out


SPLIT_CHUNK = 4096  # rows of B split to bf16 at a time
