"""Cholesky factors of a batch of large matrices, by panels: the batch's work in a few large products.

torch.linalg.cholesky_ex on a CUDA batch [E, K, K] runs cuSOLVER's batched factorization, built for many
small matrices: at an MoE stage's expert Hessians (20 × 7168² under hessian_tokens=routed at DeepSeek-V3)
it reaches ~10 TFLOP/s, and the factorizations were a third of the stage's solve. Right-looking by
panels of PANEL columns instead, each step is one batched factorization of the E diagonal blocks
(PANEL² each, what cuSOLVER's batched routine is good at), one batched triangular solve for the panel
below them, and the trailing update of the lower triangle as batched fp32 products, block row by block
row (the upper triangle is never read). Every operation is the fp32 arithmetic of a blocked Cholesky;
only the order of the sums differs from cuSOLVER's.
"""

from __future__ import annotations

import torch
from torch import Tensor

PANEL = 1024  # columns factored per step; also the row blocks of the trailing update
BATCHED_MIN_WIDTH = 2 * PANEL  # narrower batches (the experts' down projections at 2048) stay with cuSOLVER


def cholesky_ex(A: Tensor) -> tuple[Tensor, Tensor]:
    """(L, info) as torch.linalg.cholesky_ex(A) for A [E, K, K]: on CUDA batches of wide matrices by panels
    (factors_by_panels, A overwritten), elsewhere torch's own."""
    if A.is_cuda and A.dim() == 3 and A.shape[0] > 1 and A.shape[-1] > BATCHED_MIN_WIDTH:
        return factors_by_panels(A)
    return torch.linalg.cholesky_ex(A)


def factors_by_panels(A: Tensor, panel: int = PANEL) -> tuple[Tensor, Tensor]:
    """Lower Cholesky factors of the symmetric A [E, K, K] (its lower triangle read), computed in A's memory
    and returned with info [E] int32: 0 where factored, else the order of the first leading minor found not
    positive definite (that matrix's factor is then undefined, the others' unaffected)."""
    E, K, _ = A.shape
    info = torch.zeros(E, dtype=torch.int32, device=A.device)
    for j0 in range(0, K, panel):
        j1 = min(j0 + panel, K)
        diagonal, failed = torch.linalg.cholesky_ex(A[:, j0:j1, j0:j1])
        info = torch.where((info == 0) & (failed > 0), failed + j0, info)
        A[:, j0:j1, j0:j1] = diagonal
        if j1 == K:
            break
        # the panel below: P Lⱼⱼᵀ = A[j1:, j0:j1]
        below = torch.linalg.solve_triangular(diagonal.mT, A[:, j1:, j0:j1], upper=True, left=False)
        A[:, j1:, j0:j1] = below
        for r0 in range(j1, K, panel):  # lower triangle of the trailing matrix, one block row at a time
            r1 = min(r0 + panel, K)
            A[:, r0:r1, j1:r1].baddbmm_(below[:, r0 - j1:r1 - j1], below[:, :r1 - j1].mT, alpha=-1.0)
    return A.tril_(), info
