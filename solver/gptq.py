"""Exact GPTQ: Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (arXiv:2210.17323), Algorithm 1.

Per layer the solver quantizes W [N, K] column by column, each time moving the remaining
unquantized columns to compensate the rounding error, optimal for the quadratic objective
tr((W - Q) H (W - Q)ᵀ) of `solver/hessian.py`:

- Section 2, Eq. (2) and (3): the OBS update of the remaining weights after quantizing one column,
  and the removal of that column from the inverse Hessian.
- Section 3, Step 1 "Arbitrary Order Insight": all rows share one column order, so one inverse
  Hessian serves all rows. Act-order (the reference implementation's `act_order`/`desc_act`
  heuristic) picks that order as descending diag(H).
- Section 3, Step 2 "Lazy Batch-Updates": the update of later columns is applied in batches of
  `column_batch` columns (the paper's B); within a batch columns update one another at once.
- Section 3, Step 3 "Cholesky Reformulation": the rows of the upper Cholesky factor U of
  (H + λI)⁻¹ are exactly the rows of the sequentially-eliminated inverse Hessian the OBS update
  needs (scaled by the square root of their diagonal); λ = damp_percent · mean(diag(H)).
- Grouping (the paper's group-wise quantization, `solver/grid.py`): the grid of a group is found
  when the solve reaches its first column, from the current, error-updated W (as the reference
  implementation); `static_groups` fixes every group's grid from the unquantized W beforehand,
  in original column order.

One deliberate difference from the reference code: a group's grid is computed from its columns with
every earlier error update applied, including the not-yet-flushed updates of the current column
batch; the reference reads the global W, which lacks them when group_size < column_batch. Here the
result does not depend on column_batch, and it equals the textbook column-by-column algorithm.

Two implementations of the column loop, one algorithm: on CUDA with triton, `solver/gptq_fused.py`
(a Triton kernel per column batch, working from R = U⁻¹ so U is never formed; its loss comes from
the scaled errors it sums, see there); elsewhere the torch loop below.
"""

import dataclasses
import importlib.util
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rayquant.solver.valid_settings import (bits_problem, damp_increment_problem, damp_problem, group_size_problem,
                                             solve_order_problem)
from rayquant.solver.grid import (act_order, count_groups, dequantize, find_grid,
                                  find_group_grids, group_aware_order, group_index, group_width, max_level, quantize_to_grid)
from rayquant.solver.hessian import InvalidSolverInput, layer_loss, layer_objective

__all__ = ["GPTQConfig", "GPTQResult", "HessianNotPositiveDefinite", "InvalidGPTQConfig", "dequantize",
           "solve_gptq", "solve_input_group"]


class InvalidGPTQConfig(ValueError):
    """A GPTQConfig field is outside what the solver and the checkpoint format support."""


class HessianNotPositiveDefinite(Exception):
    """The damped Hessian stayed non positive definite up to the damping cap."""

    def __init__(self, message: str, n_tokens: int | None = None, damp_tried: tuple[float, ...] = ()) -> None:
        super().__init__(message)
        self.n_tokens = n_tokens
        self.damp_tried = damp_tried


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4                 # 2, 3, 4, 8: fewer bits, smaller checkpoint, larger error
    group_size: int = 128         # -1 = one group over all K; smaller groups: lower error, more scales
    desc_act: bool = False        # act-order: columns by descending diag(H); lower error, g_idx permuted
    sym: bool = True              # symmetric grid, zero = (maxq+1)//2; asym fits skewed groups better
    static_groups: bool = False   # group grids fixed from the unquantized W before the solve
    act_group_aware: bool = False  # GAR: act-order inside each group and across groups, g_idx stays sequential
    damp_percent: float = 0.01    # relative to mean(diag(H)); more damping: stabler, less exact
    damp_auto_increment: float = 0.01  # added to damp_percent while Cholesky fails (0 = never)
    damp_cap: float = 1.0         # give up (HessianNotPositiveDefinite) past this damp_percent
    column_batch: int = 128       # lazy-update width (paper's B); speed only, the result is the same

    def __post_init__(self) -> None:
        problems = [f"quant.{p}" for p in (
            bits_problem(self.bits), group_size_problem(self.group_size), damp_problem(self.damp_percent),
            damp_increment_problem(self.damp_auto_increment),
            solve_order_problem(self.desc_act, self.act_group_aware)) if p is not None]
        if not self.damp_cap >= self.damp_percent:
            problems.append(f"damp_cap={self.damp_cap} must be >= quant.damp_percent={self.damp_percent}")
        if self.column_batch < 1:
            problems.append(f"column_batch={self.column_batch} must be positive")
        if problems:
            raise InvalidGPTQConfig("; ".join(problems))


@dataclass(frozen=True)
class GPTQResult:
    codes: Tensor    # [N, K] uint8, integer levels in ORIGINAL column order
    scales: Tensor   # [G, N] float32, already rounded to float16-representable values
    zeros: Tensor    # [G, N] int32 unpacked zero points (sym: (maxq+1)//2)
    g_idx: Tensor    # [K] int32 group of each input channel
    loss: float      # tr((W-Q) H (W-Q)^T), H = hessian_sum / n_tokens (dead columns fixed, no damping)
    damp_percent: float  # damping actually used (after auto increments)


@dataclass(frozen=True)
class _Solution:
    codes: Tensor    # [N, K] uint8, original column order
    scales: Tensor   # [G, N] compute dtype
    zeros: Tensor    # [G, N] compute dtype
    g_idx: Tensor    # [K] int64
    damp_percent: float
    Q: Tensor | None         # [N, K] compute dtype, dequantized, original order (torch path)
    row_loss: Tensor | None  # [N] float64 per-row loss from the fused path's error sums


@dataclass(frozen=True)
class _HessianFactor:
    L: Tensor        # [K, K] lower Cholesky factor of J (H + λI) J, J reversing the (solve) order
    damp_percent: float
    damping: float   # λ = damp_percent · mean(diag(H))


def solve_gptq(weight: Tensor, hessian_sum: Tensor, n_tokens: int, cfg: GPTQConfig) -> GPTQResult:
    """Quantize one linear's weight [N, K] with GPTQ against hessian_sum [K, K] over n_tokens.

    Raises:
        HessianNotPositiveDefinite: Cholesky failed for every damping up to cfg.damp_cap.
        InvalidSolverInput: shapes disagree, n_tokens < 1, or (subclass) NaN/Inf inputs.
    """
    return solve_input_group([weight], hessian_sum, n_tokens, cfg)[0]


def solve_input_group(weights: list[Tensor], hessian_sum: Tensor, n_tokens: int,
                      cfg: GPTQConfig) -> list[GPTQResult]:
    """Quantize linears sharing one input (one H) as one stacked [ΣN_i, K] matrix, one factorization.

    Raises:
        HessianNotPositiveDefinite: Cholesky failed for every damping up to cfg.damp_cap.
        InvalidSolverInput: shapes disagree, n_tokens < 1, or (subclass) NaN/Inf inputs.
    """
    if not weights or any(w.dim() != 2 or w.shape[1] != weights[0].shape[1] for w in weights):
        raise InvalidSolverInput(
            f"an input group needs one or more weights [N_i, K] with one in_features K, got shapes "
            f"{[tuple(w.shape) for w in weights]}")
    # cat promotes dtypes: float64 when any linear is float64, so an exact comparison stays exact
    stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
    objective = layer_objective(stacked, hessian_sum, n_tokens)
    solution = _solve(objective.W, objective.H, n_tokens, cfg)
    results = []
    row = 0
    for w in weights:
        rows = slice(row, row + w.shape[0])
        row += w.shape[0]
        results.append(GPTQResult(
            codes=solution.codes[rows],
            scales=solution.scales[:, rows].float(),
            zeros=solution.zeros[:, rows].to(torch.int32),
            g_idx=solution.g_idx.to(torch.int32),
            loss=(layer_loss(objective.W[rows], solution.Q[rows], objective.H) if solution.row_loss is None
                  else float(solution.row_loss[rows].sum())),
            damp_percent=solution.damp_percent,
        ))
    return results


def _solve(W: Tensor, H: Tensor, n_tokens: int, cfg: GPTQConfig) -> _Solution:
    """Algorithm 1 on the objective's W [N, K], H [K, K]; W and H are not modified."""
    N, K = W.shape
    n_groups = count_groups(cfg.group_size, K)
    if cfg.desc_act:
        perm = act_order(H)
    elif cfg.act_group_aware:
        perm = group_aware_order(H, group_width(cfg.group_size, K))
    else:
        perm = torch.arange(K, device=W.device)
    reordered = cfg.desc_act or cfg.act_group_aware
    g_idx = group_index(perm, cfg.group_size, cfg.static_groups)
    if cfg.static_groups:
        grids = find_group_grids(W, g_idx, n_groups, cfg.bits, cfg.sym)
        scales, zeros = grids.scale, grids.zero  # [G, N]
    else:
        scales = W.new_zeros(n_groups, N)
        zeros = W.new_zeros(n_groups, N)
    group_of = g_idx[perm]  # group of each column in solve order

    fused = _runs_fused(W)
    if reordered:  # an indexing copy: the objective's W stays intact (H is permuted inside the factor)
        W = W[:, perm]
    elif not fused:
        W = W.clone()  # the torch loop moves W in place; the objective's W stays intact for the loss
    factor = _cholesky_factor(H, n_tokens, cfg, perm if reordered else None)
    invperm = torch.argsort(perm)
    if fused:
        from rayquant.solver.gptq_fused import quantize_column_batches
        # R = J L J is upper with H + λI = R Rᵀ, so U = R⁻¹: the fused loop works from R, never forming U.
        # L is dropped once R exists: at K = 53248 each K×K fp32 matrix is 11 GB.
        R, damping, damp_percent = factor.L.flip(0, 1), factor.damping, factor.damp_percent
        del factor
        result = quantize_column_batches(W, R, damping, scales, zeros, group_of, cfg.bits,
                                         cfg.group_size, cfg.sym, cfg.static_groups, cfg.column_batch)
        codes = result.codes[:, invperm] if reordered else result.codes
        solution = _Solution(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, damp_percent=damp_percent,
                             Q=None, row_loss=result.row_loss)
    else:
        U = _invert_lower(factor.L).flip(0, 1).contiguous()  # row-major: the loop reads rows of U
        codes, Q = _quantize_columns(W, U, scales, zeros, group_of.tolist(), cfg)
        solution = _Solution(codes=codes[:, invperm], scales=scales, zeros=zeros, g_idx=g_idx,
                             damp_percent=factor.damp_percent, Q=Q[:, invperm], row_loss=None)
    if cfg.act_group_aware and not cfg.static_groups:
        solution = _groups_in_channel_order(solution, perm, group_width(cfg.group_size, K))
    return solution


def _groups_in_channel_order(solution: _Solution, perm: Tensor, width: int) -> _Solution:
    """GAR's groups were numbered in solve order; renumber them by channel so g_idx = channel // width
    (what a desc_act=false checkpoint means) with the scale/zero rows moved to match."""
    channel_group = perm[::width] // width  # the channel block solved r-th
    scales, zeros = torch.empty_like(solution.scales), torch.empty_like(solution.zeros)
    scales[channel_group], zeros[channel_group] = solution.scales, solution.zeros
    g_idx = torch.arange(perm.numel(), device=perm.device) // width
    return dataclasses.replace(solution, scales=scales, zeros=zeros, g_idx=g_idx)


def _runs_fused(W: Tensor) -> bool:
    """The Triton column loop runs on CUDA where triton is installed; elsewhere the torch loop (same result)."""
    return W.is_cuda and importlib.util.find_spec("triton") is not None


def _quantize_columns(W: Tensor, U: Tensor, scales: Tensor, zeros: Tensor, group_of: list[int],
                      cfg: GPTQConfig) -> tuple[Tensor, Tensor]:
    """The column loop in torch, one column at a time: W [N, K] solve order (updated in place) -> codes, Q.

    Fills scales, zeros [G, N] at each dynamic group start.
    """
    N, K = W.shape
    maxq = max_level(cfg.bits)
    width = group_width(cfg.group_size, K)
    codes = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    Q = torch.zeros_like(W)
    B = cfg.column_batch
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = W[:, i1:i2]   # view: in-batch updates go straight into W
        E1 = torch.zeros_like(W1)  # [N, i2-i1] scaled errors (w - q) / U[j, j]
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not cfg.static_groups and j % width == 0:
                grid = find_grid(_current_group(W, E1, U, i1, i2, j, width), cfg.bits, cfg.sym)
                scales[j // width], zeros[j // width] = grid.scale, grid.zero
            k = group_of[j]
            w = W1[:, i]
            q = quantize_to_grid(w, scales[k], zeros[k], maxq)
            codes[:, j] = q.to(torch.uint8)
            Q[:, j] = (q - zeros[k]) * scales[k]
            err = (w - Q[:, j]) / U1[i, i]
            W1[:, i:] -= torch.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # the lazy batch update of all later columns
    return codes, Q


def _current_group(W: Tensor, E1: Tensor, U: Tensor, i1: int, i2: int, j: int, width: int) -> Tensor:
    """Columns [j, j+width) of W [N, K] with every error update of columns < j applied.

    Columns inside the current batch [i1, i2) already have them; later columns still lack the
    batch's pending update -E1[:, :j-i1] @ U[i1:j, ·], which is added here for the grid only.
    """
    end = min(j + width, W.shape[1])
    if end <= i2 or j == i1:  # nothing pending for these columns
        return W[:, j:end]
    beyond = W[:, i2:end] - E1[:, :j - i1] @ U[i1:j, i2:end]
    return torch.cat([W[:, j:i2], beyond], dim=1)


def _cholesky_factor(H: Tensor, n_tokens: int, cfg: GPTQConfig, perm: Tensor | None = None) -> _HessianFactor:
    """Cholesky factor of the damped H (in solve order `perm`, if given) reversed, growing damp_percent
    on failure. The permuted, reversed copy is the only K×K copy made besides L (11 GB each at K = 53248).

    With J the reversal of rows and columns, J (H + λI) J = L Lᵀ gives (H + λI)⁻¹ = Uᵀ U for
    U = J L⁻¹ J (upper, positive diagonal): the upper Cholesky factor of the inverse that Section 3
    Step 3 needs, from one Cholesky and a triangular inverse (instead of Cholesky, cholesky_inverse
    and a second Cholesky).

    Raises:
        HessianNotPositiveDefinite: no damping up to cfg.damp_cap gave a positive definite matrix.
    """
    K = H.shape[0]
    mean_diag = torch.mean(torch.diagonal(H))  # damp relative to it, so it is independent of n_tokens
    tried = []
    for damp_percent in _damping_schedule(cfg):
        tried.append(damp_percent)
        damping = damp_percent * mean_diag
        damped = H.flip(0, 1) if perm is None else _permuted_copy(H, perm.flip(0))
        damped.diagonal().add_(damping)
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0 and bool(torch.isfinite(torch.diagonal(L)).all()):
            return _HessianFactor(L=L, damp_percent=damp_percent, damping=float(damping))
    steps = f" in steps of {cfg.damp_auto_increment}" if len(tried) > 1 else ""
    raise HessianNotPositiveDefinite(
        f"Hessian not positive definite: Cholesky failed after damping {tried[0]} to {tried[-1]}{steps} "
        f"(in_features={K}, n_tokens={n_tokens}); raise quant.damp_percent (e.g. 0.05) or calibration.n_samples",
        n_tokens=n_tokens, damp_tried=tuple(tried))


def _permuted_copy(H: Tensor, index: Tensor) -> Tensor:
    """H[index][:, index], gathered in row chunks: no second full-size temporary."""
    out = torch.empty_like(H)
    for i in range(0, index.numel(), PERMUTE_ROWS):
        out[i:i + PERMUTE_ROWS] = H[index[i:i + PERMUTE_ROWS]][:, index]
    return out


PERMUTE_ROWS = 4096  # rows gathered at a time by _permuted_copy
TRIANGULAR_SOLVE_MAX = 2048  # below this a triangular solve against I; above, halves joined by products


def _invert_lower(L: Tensor) -> Tensor:
    """L⁻¹ of a lower-triangular L [K, K].

    [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [-D⁻¹ C A⁻¹, D⁻¹]]: large K costs matrix products (2K³/3 flops)
    rather than one triangular solve with K right-hand sides (K³ flops, at a lower rate).
    """
    K = L.shape[0]
    if K <= TRIANGULAR_SOLVE_MAX:
        return torch.linalg.solve_triangular(L, torch.eye(K, dtype=L.dtype, device=L.device), upper=False)
    h = K // 2
    A_inv = _invert_lower(L[:h, :h])
    D_inv = _invert_lower(L[h:, h:])
    inverse = torch.zeros_like(L)
    inverse[:h, :h] = A_inv
    inverse[h:, h:] = D_inv
    inverse[h:, :h] = -(D_inv @ (L[h:, :h] @ A_inv))
    return inverse


def _damping_schedule(cfg: GPTQConfig) -> list[float]:
    """damp_percent, then + k · damp_auto_increment while it stays within damp_cap."""
    if cfg.damp_auto_increment == 0:
        return [cfg.damp_percent]
    n_steps = math.floor((cfg.damp_cap - cfg.damp_percent) / cfg.damp_auto_increment + 1e-9)
    # rounded so the recorded damping reads 0.03, not 0.030000000000000002
    return [round(cfg.damp_percent + k * cfg.damp_auto_increment, 12) for k in range(n_steps + 1)]
