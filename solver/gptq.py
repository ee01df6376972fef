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
the scaled errors it sums, see there); elsewhere the torch loop of `solver/gptq_torch.py`.

Many input groups at once (`solve_input_groups`, an MoE block's experts): groups that share one Hessian
are one stacked solve (one factorization, as linears of one input group are); groups with Hessians of
their own and equal shapes are batched (one batched Cholesky; one column loop whose every launch or
step covers every problem). Rows and problems never mix in the algorithm, so each group's result is
the one it gets alone.
"""

import dataclasses
import functools
import importlib.util
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rayquant.solver.valid_settings import (bits_problem, damp_increment_problem, damp_problem, group_size_problem,
                                             solve_order_problem)
from rayquant.solver.batched_cholesky import cholesky_ex
from rayquant.solver.gptq_torch import quantize_columns
from rayquant.solver.grid import (act_order, count_groups, dequantize, find_group_grids, group_aware_order,
                                  group_index, group_width)
from rayquant.solver.hessian import (InvalidSolverInput, check_layer_inputs, compute_dtype, layer_loss,
                                     objective_hessians, objective_weights)

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
        self.problem = 0  # which Hessian of a batched factorization (solver internal)
        self.group: int | None = None  # solve_input_groups: the index of the group whose Hessian failed


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
class GroupProblem:
    """One input group to solve: its linears' weights [N_i, K] (any float dtype; converted a chunk at a
    time) and the Hessian sum they share over n_tokens."""

    weights: list[Tensor]
    hessian_sum: Tensor
    n_tokens: int


@dataclass
class _Factors:
    """The factored Hessians of a batch of E problems of one width K."""

    H: Tensor               # [E, K, K] the objectives' H (dead inputs fixed), kept for the torch path's loss
    dead: Tensor            # [E, K] bool: inputs no token reached (their weights are zeroed)
    perm: list[Tensor]      # per problem: the solve order
    factor: Tensor          # [E, K, K] what the column loop works from, in solve order: R (fused) or U (torch)
    damp_percent: list[float]
    damping: list[float]    # λ = damp_percent · mean(diag(H))


# compute-dtype bytes of weights, Hessians and factors one batched solve holds at once: bounds the memory of
# many experts' solves (each chunk factors its Hessians and runs its column loop); one input group is never cut
SOLVE_CHUNK_BYTES = 4 << 30


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
    return solve_input_groups([GroupProblem(weights, hessian_sum, n_tokens)], cfg)[0]


def solve_input_groups(groups: list[GroupProblem], cfg: GPTQConfig) -> list[list[GPTQResult]]:
    """Quantize many input groups at once (an MoE block's experts); per group, one result per weight.

    Groups whose hessian_sum is one tensor (every expert's gate/up under all-token calibration) are one
    stacked solve: one factorization, their rows in one column loop. Groups with Hessians of their own
    and equal shapes (the experts' down projections) are batched: one batched Cholesky, one column loop
    over every expert's rows. Each group's result is the one `solve_input_group` gives it alone (bitwise
    on CPU; on CUDA, batched library calls may round differently).

    Raises:
        HessianNotPositiveDefinite: Cholesky failed for every damping up to cfg.damp_cap (`group`: which).
        InvalidSolverInput: shapes disagree, n_tokens < 1, or (subclass) NaN/Inf inputs.
    """
    checked: set[int] = set()
    for g in groups:
        _check_weights(g.weights)
        for w in g.weights:  # a Hessian many experts share is checked for NaN once
            check_layer_inputs(w, g.hessian_sum, g.n_tokens, hessian_values=id(g.hessian_sum) not in checked)
            checked.add(id(g.hessian_sum))
    sharing: dict[int, list[int]] = {}  # one entry per Hessian tensor: the groups that share it
    for i, g in enumerate(groups):
        sharing.setdefault(id(g.hessian_sum), []).append(i)
    batches: dict[tuple, list[list[int]]] = {}  # Hessians whose solves fit one batch: same K, rows and dtype
    for members in sharing.values():
        weights = [w for i in members for w in groups[i].weights]
        dtype = compute_dtype(functools.reduce(torch.promote_types, [w.dtype for w in weights]))
        hessian = groups[members[0]].hessian_sum
        key = (hessian.shape[0], sum(w.shape[0] for w in weights), hessian.device, dtype)
        batches.setdefault(key, []).append(members)
    results: list[list[GPTQResult] | None] = [None] * len(groups)
    for (K, rows, _, dtype), problems in batches.items():
        per_problem = dtype.itemsize * (rows * K + 3 * K * K)  # W + Z (+ codes, spans); H, damped copy, factor
        step = max(1, SOLVE_CHUNK_BYTES // per_problem)
        for c in range(0, len(problems), step):
            batch = problems[c:c + step]
            _solve_problems([[groups[i] for i in members] for members in batch], dtype, cfg, batch, results)
    return results


def _check_weights(weights: list[Tensor]) -> None:
    if not weights or any(w.dim() != 2 or w.shape[1] != weights[0].shape[1] for w in weights):
        raise InvalidSolverInput(
            f"an input group needs one or more weights [N_i, K] with one in_features K, got shapes "
            f"{[tuple(w.shape) for w in weights]}")


def _solve_problems(problems: list[list[GroupProblem]], dtype: torch.dtype, cfg: GPTQConfig,
                    indices: list[list[int]], results: list) -> None:
    """One batch: problems[e] are the groups sharing Hessian e (every e of one width, row count and compute
    dtype); fills results[indices[e][j]] with group problems[e][j]'s results. One Hessian's groups are solved
    in row chunks of whole groups (SOLVE_CHUNK_BYTES), all against its one factor."""
    try:
        factors = _factor([(p[0].hessian_sum, p[0].n_tokens) for p in problems], dtype, cfg)
    except HessianNotPositiveDefinite as err:
        err.group = indices[err.problem][0]
        raise
    chunks = _row_chunks(problems[0], dtype) if len(problems) == 1 else [range(len(problems[0]))]
    for chunk in chunks:
        members = [[p[j] for j in chunk] for p in problems]
        W = objective_weights([[w for g in m for w in g.weights] for m in members], factors.dead, dtype)
        for e, solution in enumerate(_solve(W, factors, cfg)):
            row = 0
            for j, g in zip(chunk, members[e]):
                group_results = []
                for w in g.weights:
                    rows = slice(row, row + w.shape[0])
                    row += w.shape[0]
                    group_results.append(GPTQResult(
                        codes=solution.codes[rows],
                        scales=solution.scales[:, rows].float(),
                        zeros=solution.zeros[:, rows].to(torch.int32),
                        g_idx=solution.g_idx.to(torch.int32),
                        loss=(layer_loss(W[e, rows], solution.Q[rows], factors.H[e]) if solution.row_loss is None
                              else float(solution.row_loss[rows].sum())),
                        damp_percent=solution.damp_percent,
                    ))
                results[indices[e][j]] = group_results


def _row_chunks(groups: list[GroupProblem], dtype: torch.dtype) -> list[list[int]]:
    """Consecutive groups whose weights (with the loop's working copies) fit SOLVE_CHUNK_BYTES; one at least."""
    chunks: list[list[int]] = []
    size = 0
    for j, g in enumerate(groups):
        nbytes = 3 * dtype.itemsize * sum(w.numel() for w in g.weights)  # W, its moved copy / Z, codes + spans
        if not chunks or size + nbytes > SOLVE_CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(j)
        size += nbytes
    return chunks


def _factor(hessians: list[tuple[Tensor, int]], dtype: torch.dtype, cfg: GPTQConfig) -> _Factors:
    """Objective Hessians (solver/hessian.py: H = hessian_sum / n_tokens, dead inputs fixed), their solve
    orders and what the column loop works from (R or U, from damped Cholesky factors), for a batch of E
    Hessians of one width.

    Raises:
        HessianNotPositiveDefinite: for problem `err.problem`, no damping up to cfg.damp_cap worked.
    """
    K = hessians[0][0].shape[0]
    H, dead = objective_hessians(hessians, dtype)
    E = H.shape[0]
    if cfg.desc_act:
        perm = [act_order(h) for h in H]
    elif cfg.act_group_aware:
        perm = [group_aware_order(h, group_width(cfg.group_size, K)) for h in H]
    else:
        perm = [torch.arange(K, device=H.device)] * E
    reordered = cfg.desc_act or cfg.act_group_aware
    L, damp_percent, damping = _cholesky_factors(H, [n for _, n in hessians], cfg, perm if reordered else None)
    if _runs_fused(H):  # R = J L J is upper with H + λI = R Rᵀ, so U = R⁻¹: the fused loop works from R only
        factor = L.flip(1, 2)
    else:
        factor = torch.stack([_invert_lower(lower).flip(0, 1) for lower in L])  # U, row-major rows
    del L  # at K = 53248 each K×K fp32 matrix is 11 GB
    return _Factors(H=H, dead=dead, perm=perm, factor=factor, damp_percent=damp_percent, damping=damping)


def _solve(W: Tensor, factors: _Factors, cfg: GPTQConfig) -> list[_Solution]:
    """Algorithm 1 on the objectives' W [E, N, K] against their factored Hessians; W is not modified."""
    E, N, K = W.shape
    n_groups = count_groups(cfg.group_size, K)
    reordered = cfg.desc_act or cfg.act_group_aware
    g_idx = [group_index(p, cfg.group_size, cfg.static_groups) for p in factors.perm]
    if cfg.static_groups:
        grids = [find_group_grids(W[e], g_idx[e], n_groups, cfg.bits, cfg.sym) for e in range(E)]
        scales = torch.stack([g.scale for g in grids])  # [E, G, N]
        zeros = torch.stack([g.zero for g in grids])
    else:
        scales = W.new_zeros(E, n_groups, N)
        zeros = W.new_zeros(E, n_groups, N)
    group_of = torch.stack([g[p] for g, p in zip(g_idx, factors.perm)])  # [E, K] group of each column in solve order

    fused = _runs_fused(W)
    if reordered:  # an indexing copy: the objective's W stays intact (H is permuted inside the factor)
        moved = torch.empty_like(W)
        for e in range(E):
            torch.index_select(W[e], 1, factors.perm[e], out=moved[e])
    else:  # the torch loop moves W in place; the objective's W stays intact for the loss
        moved = W if fused else W.clone()
    invperm = [torch.argsort(p) for p in factors.perm]
    if fused:
        from rayquant.solver.gptq_fused import quantize_column_batches
        result = quantize_column_batches(moved, factors.factor, factors.damping, scales, zeros, group_of, cfg.bits,
                                         cfg.group_size, cfg.sym, cfg.static_groups, cfg.column_batch)
        solutions = [_Solution(codes=result.codes[e][:, invperm[e]] if reordered else result.codes[e],
                               scales=scales[e], zeros=zeros[e], g_idx=g_idx[e], damp_percent=factors.damp_percent[e],
                               Q=None, row_loss=result.row_loss[e]) for e in range(E)]
    else:
        codes, Q = quantize_columns(moved, factors.factor, scales, zeros, group_of, cfg)
        solutions = [_Solution(codes=codes[e][:, invperm[e]], scales=scales[e], zeros=zeros[e], g_idx=g_idx[e],
                               damp_percent=factors.damp_percent[e], Q=Q[e][:, invperm[e]], row_loss=None)
                     for e in range(E)]
    if cfg.act_group_aware and not cfg.static_groups:
        width = group_width(cfg.group_size, K)
        solutions = [_groups_in_channel_order(s, p, width) for s, p in zip(solutions, factors.perm)]
    return solutions


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


def _cholesky_factors(H: Tensor, n_tokens: list[int], cfg: GPTQConfig,
                      perm: list[Tensor] | None) -> tuple[Tensor, list[float], list[float]]:
    """Cholesky factors L [E, K, K] of the damped H [E, K, K] (in solve order `perm`, if given) reversed,
    each growing its damp_percent on failure; with the damp_percent and λ each used. The permuted,
    reversed copy is the only K×K copy made besides L (11 GB each at K = 53248).

    With J the reversal of rows and columns, J (H + λI) J = L Lᵀ gives (H + λI)⁻¹ = Uᵀ U for
    U = J L⁻¹ J (upper, positive diagonal): the upper Cholesky factor of the inverse that Section 3
    Step 3 needs, from one Cholesky and a triangular inverse (instead of Cholesky, cholesky_inverse
    and a second Cholesky).

    Raises:
        HessianNotPositiveDefinite: no damping up to cfg.damp_cap gave a positive definite matrix
            (`problem`: the index in the batch of the first such H).
    """
    E, K = H.shape[0], H.shape[1]
    mean_diag = [torch.mean(torch.diagonal(h)) for h in H]  # damp relative to it: independent of n_tokens
    schedule = _damping_schedule(cfg)
    L: Tensor | None = None
    used: list[float | None] = [None] * E
    pending = list(range(E))
    for damp_percent in schedule:
        if len(pending) > 1:
            damped = torch.empty(len(pending), K, K, dtype=H.dtype, device=H.device)
        for i, e in enumerate(pending):
            copy = H[e].flip(0, 1) if perm is None else _permuted_copy(H[e], perm[e].flip(0))
            if len(pending) == 1:
                damped = copy.unsqueeze(0)  # no second copy: at K = 53248 each is 11 GB
            else:
                damped[i] = copy
            damped[i].diagonal().add_(damp_percent * mean_diag[e])
        factor, info = cholesky_ex(damped)  # by panels for a CUDA batch of wide matrices (MoE experts)
        del damped
        ok = ((info == 0) & torch.isfinite(torch.diagonal(factor, dim1=1, dim2=2)).all(dim=1)).tolist()
        if L is None and all(ok):
            L = factor  # no copy: at K = 53248 the one factor is 11 GB
        else:
            L = torch.empty(E, K, K, dtype=H.dtype, device=H.device) if L is None else L
            for i, e in enumerate(pending):
                if ok[i]:
                    L[e] = factor[i]
        for i, e in enumerate(pending):
            if ok[i]:
                used[e] = damp_percent
        del factor
        pending = [e for i, e in enumerate(pending) if not ok[i]]
        if not pending:
            return L, used, [float(d * m) for d, m in zip(used, mean_diag)]
    steps = f" in steps of {cfg.damp_auto_increment}" if len(schedule) > 1 else ""
    err = HessianNotPositiveDefinite(
        f"Hessian not positive definite: Cholesky failed after damping {schedule[0]} to {schedule[-1]}{steps} "
        f"(in_features={K}, n_tokens={n_tokens[pending[0]]}); raise quant.damp_percent (e.g. 0.05) or "
        "calibration.n_samples", n_tokens=n_tokens[pending[0]], damp_tried=tuple(schedule))
    err.problem = pending[0]
    raise err


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
