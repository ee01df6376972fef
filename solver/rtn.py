"""Round-to-nearest (RTN): the baseline GPTQ is measured against (Frantar et al., 2022, experiments).

Every weight is rounded to the nearest level of its group's grid, with no error compensation.
Grids, groups, act-order g_idx, dead inputs and the loss follow exactly the rules of
`solver/gptq.py`, so the two losses are comparable number for number.
"""

import torch
from torch import Tensor

from rayquant.solver.gptq import GPTQConfig, GPTQResult
from rayquant.solver.grid import count_groups, find_group_grids, group_index, max_level, quantize_to_grid
from rayquant.solver.hessian import check_layer_inputs, compute_dtype, layer_loss


def quantize_rtn(weight: Tensor, hessian_sum: Tensor, n_tokens: int, cfg: GPTQConfig) -> GPTQResult:
    """Round weight [N, K] to its group grids; loss against H = hessian_sum / n_tokens.

    Grids come from the unquantized W (there are no error updates, so static_groups only changes
    which columns form a group under desc_act). No damping is used: damp_percent is 0.0.

    Raises:
        InvalidSolverInput: shapes disagree, n_tokens < 1, or (subclass) NaN/Inf inputs.
    """
    check_layer_inputs(weight, hessian_sum, n_tokens)
    # No private copy of H (11 GB at K = 53248): the loss is linear in H, and dead columns
    # (diag = 0) carry no error once W is zeroed there, as the objective does.
    S = hessian_sum.to(compute_dtype(weight.dtype))
    diag = torch.diagonal(S) / n_tokens
    dead = diag == 0
    W = weight.to(dtype=S.dtype, copy=True)
    W[:, dead] = 0.0
    K = W.shape[1]
    perm = (torch.argsort(torch.where(dead, torch.ones_like(diag), diag), descending=True, stable=True)
            if cfg.desc_act else torch.arange(K, device=W.device))
    g_idx = group_index(perm, cfg.group_size, cfg.static_groups)
    grids, codes, Q = _round(W, g_idx, cfg)
    return GPTQResult(
        codes=codes.to(torch.uint8),
        scales=grids.scale.float(),
        zeros=grids.zero.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        loss=layer_loss(W, Q, S, parts=1) / n_tokens,  # a baseline: 1e-5 relative is plenty on CUDA
        damp_percent=0.0,
    )


def rtn_weight(weight: Tensor, cfg: GPTQConfig) -> Tensor:
    """The whole weight [N, K] rounded to its group grids and dequantized, in float32.

    The baseline model of the in-pass evaluation: with no Hessian there are no dead columns and no
    act-order permutation, so groups are consecutive columns.
    """
    W = weight.float()
    g_idx = group_index(torch.arange(W.shape[1], device=W.device), cfg.group_size, cfg.static_groups)
    return _round(W, g_idx, cfg)[2]


def _round(W: Tensor, g_idx: Tensor, cfg: GPTQConfig):
    """Grids of W's groups, codes, and the dequantized weight [N, K]."""
    grids = find_group_grids(W, g_idx, count_groups(cfg.group_size, W.shape[1]), cfg.bits, cfg.sym)
    scale = grids.scale[g_idx].T  # [N, K]
    zero = grids.zero[g_idx].T
    codes = quantize_to_grid(W, scale, zero, max_level(cfg.bits))
    return grids, codes, (codes - zero) * scale
