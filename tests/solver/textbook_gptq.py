"""Textbook GPTQ, written for reading, not speed: float64, one column at a time, explicit inverse.

Frantar et al., 2022, Section 2 (the OBS update of Eq. 2 and the row/column elimination of Eq. 3)
with the grid of the reference `Quantizer.find_params`, written out again here rather than imported,
so the solver's grid is checked too. No lazy batches, no Cholesky: after quantizing column j, all
later columns move by -(w_j - q_j) / [H⁻¹]_jj · [H⁻¹]_j,: and H⁻¹ loses row and column j
(H⁻¹ of the remaining columns F is [H_F]⁻¹ = H⁻¹ - H⁻¹_:,j H⁻¹_j,: / [H⁻¹]_jj restricted to F).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from rayquant.solver.gptq import GPTQConfig


@dataclass(frozen=True)
class TextbookResult:
    codes: Tensor   # [N, K] int64, original column order
    scales: Tensor  # [G, N] float64
    zeros: Tensor   # [G, N] float64
    g_idx: Tensor   # [K] int64
    loss: float     # tr((W-Q) H (W-Q)ᵀ), H = hessian_sum / n_tokens with dead diagonal entries set to 1


def textbook_grid(w: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero [N] of a group's columns w [N, c], as the reference Quantizer.find_params.

    Differs from the reference only where rayquant's grid does: a row with no negative entry gets
    the symmetric range too, the scale is rounded to float16 (what checkpoints store), and an asym
    zero point never is 0 (GPTQ v1 stores zero - 1): such rows use zero 1, scale xmax / (maxq - 1).
    """
    maxq = 2**bits - 1
    tmp = torch.zeros(w.shape[0], dtype=torch.float64)
    xmin = torch.minimum(w.min(1).values, tmp)
    xmax = torch.maximum(w.max(1).values, tmp)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        xmin = -xmax
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = ((xmax - xmin) / maxq).clamp(min=2.0**-24).half().double()
    if sym:
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    tmp = zero == 0
    scale[tmp] = (xmax[tmp] / (maxq - 1)).clamp(min=2.0**-24).half().double()
    zero[tmp] = 1
    return scale, zero


def textbook_gptq(weight: Tensor, hessian_sum: Tensor, n_tokens: int, cfg: GPTQConfig) -> TextbookResult:
    W = weight.double().clone()
    H = hessian_sum.double() / n_tokens
    N, K = W.shape
    maxq = 2**cfg.bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    W_orig = W.clone()
    g = K if cfg.group_size == -1 else cfg.group_size
    n_groups = (K + g - 1) // g

    if cfg.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    elif cfg.act_group_aware:
        perm = _group_aware_order(torch.diag(H).tolist(), g)
    else:
        perm = torch.arange(K)
    scales = torch.zeros(n_groups, N, dtype=torch.float64)
    zeros = torch.zeros(n_groups, N, dtype=torch.float64)
    if cfg.static_groups:
        for k in range(n_groups):
            scales[k], zeros[k] = textbook_grid(W[:, k * g:(k + 1) * g], cfg.bits, cfg.sym)
        group_of = [int(perm[j]) // g for j in range(K)]
    elif cfg.act_group_aware:  # whole channel blocks, one after another in solve order
        group_of = [int(perm[j]) // g for j in range(K)]
    else:
        group_of = [j // g for j in range(K)]

    W = W[:, perm]
    Hp = H[perm][:, perm]
    Hinv = torch.linalg.inv(Hp + cfg.damp_percent * torch.mean(torch.diag(Hp)) * torch.eye(K, dtype=torch.float64))
    codes = torch.zeros(N, K, dtype=torch.float64)
    Q = torch.zeros(N, K, dtype=torch.float64)
    for j in range(K):
        if not cfg.static_groups and j % g == 0:
            scales[group_of[j]], zeros[group_of[j]] = textbook_grid(W[:, j:j + g], cfg.bits, cfg.sym)
        s, z = scales[group_of[j]], zeros[group_of[j]]
        codes[:, j] = torch.clamp(torch.round(W[:, j] / s) + z, 0, maxq)
        Q[:, j] = s * (codes[:, j] - z)
        # OBS update (Eq. 2): the remaining weights absorb the rounding error of column j
        W[:, j:] -= torch.outer((W[:, j] - Q[:, j]) / Hinv[j, j], Hinv[j, j:])
        # eliminate j from the inverse Hessian (Eq. 3); only the remaining columns j+1.. matter
        Hinv[j + 1:, j + 1:] -= torch.outer(Hinv[j + 1:, j], Hinv[j, j + 1:]) / Hinv[j, j]

    invperm = torch.argsort(perm)
    codes, Q = codes[:, invperm], Q[:, invperm]
    g_idx = torch.tensor(group_of)[invperm]
    E = W_orig - Q
    return TextbookResult(codes=codes.long(), scales=scales, zeros=zeros, g_idx=g_idx,
                          loss=float(torch.trace(E @ H @ E.T)))


def _group_aware_order(diag: list[float], g: int) -> Tensor:
    """GAR: channel blocks of g, each block's channels by descending diag(H), full blocks by their
    largest diag(H), a partial last block last (ties: lower index first)."""
    K = len(diag)
    blocks = [sorted(range(s, min(s + g, K)), key=lambda c: (-diag[c], c)) for s in range(0, K, g)]
    full = sorted((b for b in blocks if len(b) == g), key=lambda b: (-diag[b[0]], b[0]))
    return torch.tensor([c for b in full + [b for b in blocks if len(b) < g] for c in b])

