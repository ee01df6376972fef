"""The benchmarks' baseline: Algorithm 1 of Frantar et al. (2022) as a reader of the paper writes it.

Lazy batches of 128 columns, one column at a time inside a batch, the upper Cholesky factor of
H⁻¹, symmetric per-group grids taken from the current (error-updated) weights at each group start.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def plain_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, desc_act: bool,
               damp: float = 0.01, column_batch: int = 128) -> torch.Tensor:
    """Q [N, K] in the original column order, for W [N, K] and H = mean xᵀx [K, K]."""
    W = W.float().clone()
    H = H.float().clone()
    N, K = W.shape
    maxq = 2**bits - 1
    group_size = K if group_size == -1 else group_size
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H_damped = H + damp * torch.mean(torch.diag(H)) * torch.eye(K, device=W.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H_damped)), upper=True)
    Q = torch.zeros_like(W)
    scale = zero = None
    for i1 in range(0, K, column_batch):
        i2 = min(i1 + column_batch, K)
        W1, Q1, E1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), torch.zeros_like(W[:, i1:i2])
        Hinv1 = Hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            w, d = W1[:, j], Hinv1[j, j]
            if (i1 + j) % group_size == 0:
                g = torch.cat([W1[:, j:], W[:, i2:]], dim=1)[:, :group_size]
                amax = torch.maximum(g.min(1).values.clamp(max=0).abs(), g.max(1).values.clamp(min=0))
                scale = (2 * amax / maxq).clamp(min=1e-8)
                zero = torch.full_like(scale, (maxq + 1) / 2)
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            Q1[:, j] = scale * (q - zero)
            err = (w - Q1[:, j]) / d
            W1[:, j:] -= err.unsqueeze(1) @ Hinv1[j, j:].unsqueeze(0)
            E1[:, j] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    if desc_act:
        Q = Q[:, torch.argsort(perm)]
    return Q


def layer_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W − Q) H (W − Q)ᵀ)."""
    E = W.float() - Q
    return float(((E @ H.float()) * E).sum(dtype=torch.float64))
