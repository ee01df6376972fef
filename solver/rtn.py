"""Round-to-nearest (RTN): the baseline GPTQ is measured against (Frantar et al., 2022, experiments).

Every weight is rounded to the nearest level of its group's grid, with no error compensation.
Grids, groups, act-order g_idx, dead inputs and the loss follow exactly the rules of
`solver/gptq.py`, so the two losses are comparable number for number.

Many layers of one shape (a MoE block's experts) are rounded in batched ops over [E, N, K] chunks:
the grid rules are row-wise, so each layer gets bitwise the codes, scales and zeros it gets alone.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from rayquant.solver.gptq import GPTQConfig, GPTQResult
from rayquant.solver.grid import count_groups, find_group_grids, group_index, max_level, per_column, quantize_to_grid
from rayquant.solver.hessian import InvalidSolverInput, check_layer_inputs, compute_dtype

# Bytes of the [E, N, K] temporaries (W, its grids per column, codes, Q, W - Q, (W - Q)·H) and stacked
# Hessians one batched step holds, by device type: bounds the memory of rounding 128 experts at once. On
# CUDA big batches save launches and syncs (at 1 GiB DeepSeek-V3's expert linears went 1 or 2 per batch, 2
# syncs each: 0.5 s of a block's down projections); the CPU has none to save, and its batches run faster
# while they stay near its caches (256 expert linears at 1 GiB: 1.6x slower than at 64 MiB on 2 cores).
RTN_CHUNK_BYTES = {"cuda": 4 << 30, "cpu": 64 << 20}
_TEMPORARIES = 6  # compute-dtype [N, K] tensors alive at once per layer


@dataclass(frozen=True)
class _Objective:
    """What one hessian_sum object (and token count) fixes for every layer that takes it."""

    S: Tensor      # [K, K] compute dtype: hessian_sum itself when already in it (never copied per layer)
    dead: Tensor   # [K] bool: inputs no token reached; their weights are zeroed
    g_idx: Tensor  # [K] int32, the result's (shared by the layers, as their Hessian is)


def quantize_rtn(weight: Tensor, hessian_sum: Tensor, n_tokens: int, cfg: GPTQConfig) -> GPTQResult:
    """Round weight [N, K] to its group grids; loss against H = hessian_sum / n_tokens.

    Grids come from the unquantized W (there are no error updates, so static_groups only changes
    which columns form a group under desc_act). No damping is used: damp_percent is 0.0.

    Raises:
        InvalidSolverInput: shapes disagree, n_tokens < 1, or (subclass) NaN/Inf inputs.
    """
    return quantize_rtn_many([weight], [hessian_sum], [n_tokens], cfg)[0]


def quantize_rtn_many(weights: list[Tensor], hessian_sums: list[Tensor], n_tokens: list[int],
                      cfg: GPTQConfig) -> list[GPTQResult]:
    """quantize_rtn of every (weight [N_i, K_i], hessian_sum [K_i, K_i], n_tokens) triple, in order.

    Layers of one shape and dtype are stacked and rounded in batched ops, RTN_CHUNK_BYTES at a time.
    Layers given the same hessian_sum object (an input group's linears) share its compute-dtype view,
    dead inputs and g_idx: it is scanned for NaN once, and converted at most once (fp32 sums for fp64
    weights), never when already in the compute dtype.
    Results of one chunk are views of its [E, ...] tensors.

    Raises:
        InvalidSolverInput: the lists differ in length, or a layer's shapes disagree or n_tokens < 1;
            (subclass NonFiniteSolverInput) a layer's weight or Hessian holds NaN/Inf.
    """
    if not len(weights) == len(hessian_sums) == len(n_tokens):
        raise InvalidSolverInput(
            f"{len(weights)} weights, {len(hessian_sums)} hessian_sums and {len(n_tokens)} token counts: "
            "pass one Hessian sum and one token count per weight (the same tensor for an input group)")
    objectives: dict[tuple[int, int, torch.dtype], _Objective] = {}
    keys, first_use = [], {}
    for i, (w, S, n) in enumerate(zip(weights, hessian_sums, n_tokens)):
        if not (w.dim() == 2 and S.shape == (w.shape[1], w.shape[1]) and w.device == S.device and n >= 1):
            check_layer_inputs(w, S, n)  # raises, with the message of one layer
        key = (id(S), n, compute_dtype(w.dtype))
        if key not in objectives:
            objectives[key], first_use[key] = _objective(S, n, key[2], cfg), i
        keys.append(key)
    # one NaN/Inf scan per Hessian, all read back at once (a GPU sync each would cost more than the scans)
    for key, finite in zip(first_use, _all_finite([hessian_sums[i] for i in first_use.values()])):
        if not finite:
            i = first_use[key]
            check_layer_inputs(weights[i], hessian_sums[i], n_tokens[i])  # raises, naming the NaN/Inf

    # layers of one shape, dtype and device in one batch, those sharing a Hessian next to each other
    batches: dict[tuple, list[int]] = {}
    for i in sorted(range(len(weights)), key=lambda i: first_use[keys[i]]):
        batches.setdefault((tuple(weights[i].shape), weights[i].dtype, weights[i].device), []).append(i)
    results: list[GPTQResult | None] = [None] * len(weights)
    for ((N, K), dtype, device), layers in batches.items():
        dtype = compute_dtype(dtype)
        per_layer = (_TEMPORARIES * N * K + K * K) * dtype.itemsize  # a stacked Hessian where none is shared
        step = max(1, RTN_CHUNK_BYTES.get(device.type, RTN_CHUNK_BYTES["cuda"]) // per_layer)
        for start in range(0, len(layers), step):
            chunk = layers[start:start + step]
            W = torch.stack([weights[i] for i in chunk]).to(dtype)  # [E, N, K] a private copy
            finite = torch.isfinite(W).flatten(1).all(1)
            if not bool(finite.all()):
                i = chunk[int((~finite).nonzero()[0])]
                check_layer_inputs(weights[i], hessian_sums[i], n_tokens[i])  # raises, naming the NaN/Inf
            rounded = _round_layers(W, [objectives[keys[i]] for i in chunk], [n_tokens[i] for i in chunk], cfg)
            for i, result in zip(chunk, rounded):
                results[i] = result
    return results


def _all_finite(tensors: list[Tensor]) -> list[bool]:
    """Whether each tensor is free of NaN/Inf, read back in one transfer per device."""
    flags = [torch.isfinite(t).all() for t in tensors]
    by_device: dict[torch.device, list[int]] = {}
    for j, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(j)
    finite = [True] * len(tensors)
    for members in by_device.values():
        for j, ok in zip(members, torch.stack([flags[j] for j in members]).tolist()):
            finite[j] = ok
    return finite


def _objective(hessian_sum: Tensor, n_tokens: int, dtype: torch.dtype, cfg: GPTQConfig) -> _Objective:
    """Dead inputs and g_idx of every layer taking hessian_sum; S = hessian_sum in the compute dtype."""
    # No private copy of H (11 GB at K = 53248): the loss is linear in H, and dead columns
    # (diag = 0) carry no error once W is zeroed there, as the objective does.
    S = hessian_sum.to(dtype)
    diag = torch.diagonal(S) / n_tokens
    dead = diag == 0
    K = diag.numel()
    perm = (torch.argsort(torch.where(dead, torch.ones_like(diag), diag), descending=True, stable=True)
            if cfg.desc_act else torch.arange(K, device=S.device))
    g_idx = group_index(perm, cfg.group_size, cfg.static_groups).to(torch.int32)
    return _Objective(S=S, dead=dead, g_idx=g_idx)


def _round_layers(W: Tensor, objectives: list[_Objective], n_tokens: list[int], cfg: GPTQConfig) -> list[GPTQResult]:
    """RTN of E finite layers W [E, N, K] (a private copy, zeroed at dead inputs here) in batched ops."""
    W.masked_fill_(torch.stack([o.dead for o in objectives])[:, None, :], 0.0)
    grids, codes, Q = _round(W, torch.stack([o.g_idx for o in objectives]), cfg)
    errors = _errors(W - Q, [o.S for o in objectives]).tolist()
    codes, scales, zeros = codes.to(torch.uint8), grids.scale.float(), grids.zero.to(torch.int32)
    return [GPTQResult(codes=codes[j], scales=scales[j], zeros=zeros[j], g_idx=o.g_idx, loss=errors[j] / n,
                       damp_percent=0.0)
            for j, (o, n) in enumerate(zip(objectives, n_tokens))]


def _errors(E: Tensor, hessians: list[Tensor]) -> Tensor:
    """tr(E_j S_j E_jᵀ) of each layer j, float64 [E], for E [E, N, K] and S_j [K, K].

    Consecutive layers given one S object form a run, and runs of one length r take one bmm of their
    rows [R, r·N, K] against their R Hessians, each stacked once (an input group's gate/up experts: r = 2);
    a lone run, one product with its S. Precision as `layer_loss(parts=1)`: a baseline compared at
    percent level, so on CUDA in fp32 one bf16 tensor-core product with fp32 accumulation (~1e-5).
    """
    runs: list[list[int]] = []
    for j, S in enumerate(hessians):
        if runs and hessians[runs[-1][0]] is S:
            runs[-1].append(j)
        else:
            runs.append([j])
    by_length: dict[int, list[list[int]]] = {}
    for run in runs:
        by_length.setdefault(len(run), []).append(run)
    N, K = E.shape[1:]
    if len(runs) == 1:  # one Hessian for all (one layer, or one input group)
        return (_matmul(E.flatten(0, 1), hessians[0]).view_as(E) * E).flatten(1).sum(1, dtype=torch.float64)
    products = torch.empty_like(E)  # [E, N, K]: E_j S_j
    for length, same in by_length.items():
        if len(same) == 1:
            a, b = same[0][0], same[0][-1] + 1
            products[a:b] = _matmul(E[a:b].flatten(0, 1), hessians[a]).view(b - a, N, K)
            continue
        layers = [j for run in same for j in run]
        rows = (slice(layers[0], layers[-1] + 1) if layers == list(range(layers[0], layers[-1] + 1))
                else torch.tensor(layers, device=E.device))
        S = torch.stack([hessians[run[0]] for run in same])  # [R, K, K]
        products[rows] = _matmul(E[rows].view(len(same), length * N, K), S).view(-1, N, K)
    return (products * E).flatten(1).sum(1, dtype=torch.float64)


def _matmul(A: Tensor, B: Tensor) -> Tensor:
    """A @ B, as `layer_loss(parts=1)` multiplies: bf16 operands, fp32 accumulation for fp32 on CUDA."""
    if not (A.is_cuda and A.dtype == torch.float32):
        return A @ B
    mm = torch.bmm if A.dim() == 3 else torch.mm
    return mm(A.bfloat16(), B.bfloat16(), out_dtype=torch.float32)


def rtn_weight(weight: Tensor, cfg: GPTQConfig) -> Tensor:
    """The whole weight [N, K] rounded to its group grids and dequantized, in float32.

    The baseline model of the in-pass evaluation: with no Hessian there are no dead columns and no
    act-order permutation, so groups are consecutive columns.
    """
    W = weight.float()
    g_idx = group_index(torch.arange(W.shape[1], device=W.device), cfg.group_size, cfg.static_groups)
    return _round(W, g_idx, cfg)[2]


def _round(W: Tensor, g_idx: Tensor, cfg: GPTQConfig):
    """Grids of W's groups, codes, and the dequantized weight, for W [..., N, K], g_idx [K] or [..., K]."""
    grids = find_group_grids(W, g_idx, count_groups(cfg.group_size, W.shape[-1]), cfg.bits, cfg.sym)
    scale = per_column(grids.scale, g_idx)  # [..., N, K]
    zero = per_column(grids.zero, g_idx)
    codes = quantize_to_grid(W, scale, zero, max_level(cfg.bits))
    return grids, codes, (codes - zero) * scale
