"""The column loop of GPTQ (Frantar et al., 2022, Algorithm 1) in torch: the path of `solver/gptq.py`
off CUDA (or without triton), the same algorithm as the fused kernel of `solver/gptq_fused.py`.

One column at a time: at a dynamic group start the group's grid from its current (error-updated)
columns; the column's codes and dequantized value; the scaled error moves the later columns of its
batch at once (Eq. 2, Cholesky form), and each finished batch moves all later columns in one product
(Section 3, Step 2 "Lazy Batch-Updates").

A batch of E problems (MoE experts: one Hessian each) runs as one loop: every per-column step is an
elementwise op over [E, N] and each problem's products are its own 2-D products, so each problem gets
bitwise the result it gets alone.
"""

import torch
from torch import Tensor

from rayquant.solver.grid import find_grid, group_width, max_level, quantize_to_grid


def quantize_columns(W: Tensor, U: Tensor, scales: Tensor, zeros: Tensor, group_of: Tensor,
                     cfg) -> tuple[Tensor, Tensor]:
    """W [E, N, K] in solve order (updated in place), U [E, K, K] the upper Cholesky factors of the damped
    inverse Hessians (row-major rows) -> codes [E, N, K] uint8, Q [E, N, K] dequantized, solve order.

    group_of [E, K]: the group of each column in solve order. Fills scales, zeros [E, G, N] at each
    dynamic group start (static groups: read them). `cfg` is the solve's GPTQConfig.
    """
    E, N, K = W.shape
    maxq = max_level(cfg.bits)
    width = group_width(cfg.group_size, K)
    codes = torch.zeros(E, N, K, dtype=torch.uint8, device=W.device)
    Q = torch.zeros_like(W)
    experts = torch.arange(E, device=W.device)
    B = cfg.column_batch
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = W[:, :, i1:i2]   # view: in-batch updates go straight into W
        E1 = torch.zeros_like(W1)  # [E, N, i2-i1] scaled errors (w - q) / U[j, j]
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not cfg.static_groups and j % width == 0:
                grid = find_grid(_current_group(W, E1, U, i1, i2, j, width), cfg.bits, cfg.sym)
                scales[:, j // width], zeros[:, j // width] = grid.scale, grid.zero
            k = group_of[:, j]
            scale, zero = scales[experts, k], zeros[experts, k]  # [E, N]
            w = W1[:, :, i]
            q = quantize_to_grid(w, scale, zero, maxq)
            codes[:, :, j] = q.to(torch.uint8)
            Q[:, :, j] = (q - zero) * scale
            err = (w - Q[:, :, j]) / U1[:, i, i, None]
            W1[:, :, i:] -= err[:, :, None] * U1[:, None, i, i:]
            E1[:, :, i] = err
        for e in range(E):  # the lazy batch update of all later columns
            W[e, :, i2:] -= E1[e] @ U[e, i1:i2, i2:]
    return codes, Q


def _current_group(W: Tensor, E1: Tensor, U: Tensor, i1: int, i2: int, j: int, width: int) -> Tensor:
    """Columns [j, j+width) of W [E, N, K] with every error update of columns < j applied.

    Columns inside the current batch [i1, i2) already have them; later columns still lack the
    batch's pending update -E1[:, :, :j-i1] @ U[:, i1:j, ·], which is added here for the grid only.
    """
    end = min(j + width, W.shape[2])
    if end <= i2 or j == i1:  # nothing pending for these columns
        return W[:, :, j:end]
    pending = torch.stack([E1[e, :, :j - i1] @ U[e, i1:j, i2:end] for e in range(W.shape[0])])
    return torch.cat([W[:, :, j:i2], W[:, :, i2:end] - pending], dim=2)
