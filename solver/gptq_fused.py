"""The column loop of GPTQ (Frantar et al., 2022, Algorithm 1) with each column batch fused into one
Triton kernel: the CUDA path of `solver/gptq.py`, the same algorithm as its torch loop.

Section 3, Step 2 "Lazy Batch-Updates": inside a column batch every column updates the later columns
of the batch at once (a rank-1 update per column), and only the batch's scaled errors E1 update the
rest of W afterwards (one matrix product). The torch loop spends ~10 launches per column on the first
part; here one program owns a tile of rows × the whole batch in registers and walks its columns:

    for each column j of the batch (solve order):
        at a group start: the group's grid from the tile's current (error-updated) columns
        q = clamp(round(w_j / scale) + zero, 0, maxq);  Q_j = (q - zero) · scale
        E_j = (w_j - Q_j) / U[j, j]                       (Eq. 2, Cholesky form, Section 3 Step 3)
        w_{j+1..} -= E_j · U[j, j+1..]                     (within the batch only)

and writes back the codes, Q (into W's batch columns), E1 and Σ E_j² per row. Rows are independent, so
programs never talk to each other; the batch update W[:, i2:] -= E1 @ U[i1:i2, i2:] stays a cuBLAS
product between launches.

Groups: a batch never straddles a group start except at its own first column. When groups fit in a
batch (group width <= batch width), batches hold whole groups and the kernel finds each grid at the
group's first column, from columns that already carry every earlier update (the textbook's rule).
Wider groups start at a batch start, where W carries every update: their grid comes from
`grid.find_grid` before the launch. Static grids are given; the kernel reads a grid per column.

Rounding follows torch's: IEEE division (div_rn, not Triton's default approximate fp32 division),
round half to even, float16 scales rounded through float32. This module imports triton: import it
only where CUDA and triton are present (`solver/gptq.py` does so lazily).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from rayquant.solver.grid import find_grid, max_level, raise_if_scale_overflows

BATCH_COLUMNS = 128  # columns per kernel launch: the register tile width (the paper's B)


@dataclass(frozen=True)
class FusedColumns:
    codes: Tensor      # [N, K] uint8 integer levels, solve order
    row_error: Tensor  # [N] float64 Σ_j E_j² per row: ‖E‖² of the scaled errors, for the loss


@triton.jit
def _round_half_even(x, MAGIC: tl.constexpr, EXACT_ABOVE: tl.constexpr):
    # (x + 1.5·2^m) - 1.5·2^m rounds to an integer with the FPU's round-half-even, like torch.round;
    # |x| >= 2^(m-1) is integral already or clamped away to 0 / maxq by the caller
    return tl.where(tl.abs(x) < EXACT_ABOVE, (x + MAGIC) - MAGIC, x)


@triton.jit
def _float16_scale(scale):
    # grid._float16_scale: clamp to 2^-24, round to float16 (through float32, as torch's cast does);
    # a scale beyond float16's 65504 is kept raw, for the host to report (ScaleNotRepresentable)
    rounded = tl.maximum(scale, 5.9604644775390625e-08).to(tl.float32).to(tl.float16).to(scale.dtype)
    return tl.where(scale > 65504.0, scale, rounded)


@triton.jit
def _find_grid(xmin, xmax, maxq, sym_zero, SYM: tl.constexpr, MAGIC: tl.constexpr, EXACT_ABOVE: tl.constexpr):
    # grid.find_grid, per row: the range includes 0, an all-zero row gets [-1, 1]
    xmin = tl.minimum(xmin, 0.0)
    xmax = tl.maximum(xmax, 0.0)
    if SYM:
        xmax = tl.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0.0) & (xmax == 0.0)
    xmin = tl.where(empty, -1.0, xmin)
    xmax = tl.where(empty, 1.0, xmax)
    scale = _float16_scale(tl.math.div_rn(xmax - xmin, maxq))
    if SYM:
        zero = tl.zeros_like(scale) + sym_zero
    else:
        zero = _round_half_even(tl.math.div_rn(-xmin, scale), MAGIC, EXACT_ABOVE)
        # GPTQ v1 stores zero - 1: zero point 0 becomes 1 with levels up to (maxq - 1) · scale' >= xmax
        below_one = zero < 1.0
        scale = tl.where(below_one, _float16_scale(tl.math.div_rn(xmax, maxq - 1.0)), scale)
        zero = tl.where(below_one, 1.0, zero)
        zero = tl.minimum(zero, maxq)
    return scale, zero


@triton.jit
def _column_batch_kernel(
        W_ptr, U_ptr, E_ptr, codes_ptr, scales_ptr, zeros_ptr, group_ptr, row_error_ptr,
        N, n_cols, width, first_group, maxq_in, sym_zero_in,
        stride_w, stride_u, stride_e, stride_c, stride_g,
        GRID_IN_KERNEL: tl.constexpr, SYM: tl.constexpr, MAGIC: tl.constexpr, EXACT_ABOVE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One column batch for BLOCK_N rows. W_ptr, U_ptr, codes_ptr, group_ptr point at the batch's first
    column (U at its diagonal element); scales/zeros are [G, N] with row stride stride_g."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    col_ok = cols < n_cols
    tile_ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    W1 = tl.load(W_ptr + rows64[:, None] * stride_w + cols[None, :], mask=tile_ok, other=0.0)  # [BLOCK_N, BLOCK_K]
    maxq = maxq_in.to(W1.dtype)
    sym_zero = sym_zero_in.to(W1.dtype)
    codes = tl.zeros([BLOCK_N, BLOCK_K], dtype=W1.dtype)
    E1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=W1.dtype)
    scale = tl.zeros([BLOCK_N], dtype=W1.dtype) + 1.0
    zero = tl.zeros([BLOCK_N], dtype=W1.dtype)
    for i in range(0, n_cols):
        if GRID_IN_KERNEL:
            if i % width == 0:  # a group starts: its columns [i, i + width) carry every earlier update
                in_group = (cols >= i) & (cols < i + width) & col_ok
                xmin = tl.min(tl.where(in_group[None, :], W1, float("inf")), axis=1)
                xmax = tl.max(tl.where(in_group[None, :], W1, float("-inf")), axis=1)
                scale, zero = _find_grid(xmin, xmax, maxq, sym_zero, SYM, MAGIC, EXACT_ABOVE)
                group = first_group + i // width
                tl.store(scales_ptr + group * stride_g + rows, scale, mask=row_ok)
                tl.store(zeros_ptr + group * stride_g + rows, zero, mask=row_ok)
        else:
            group = tl.load(group_ptr + i)
            scale = tl.load(scales_ptr + group * stride_g + rows, mask=row_ok, other=1.0)
            zero = tl.load(zeros_ptr + group * stride_g + rows, mask=row_ok, other=0.0)
        is_i = (cols == i)[None, :]
        w = tl.sum(tl.where(is_i, W1, 0.0), axis=1)
        q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(w, scale), MAGIC, EXACT_ABOVE) + zero, 0.0), maxq)
        dq = (q - zero) * scale
        err = tl.math.div_rn(w - dq, tl.load(U_ptr + i * stride_u + i))
        u = tl.load(U_ptr + i * stride_u + cols, mask=(cols > i) & col_ok, other=0.0)  # U[j, j+1..]
        W1 = tl.where(is_i, dq[:, None], W1 - err[:, None] * u[None, :])
        codes = tl.where(is_i, q[:, None], codes)
        E1 = tl.where(is_i, err[:, None], E1)
    tl.store(W_ptr + rows64[:, None] * stride_w + cols[None, :], W1, mask=tile_ok)
    tl.store(codes_ptr + rows64[:, None] * stride_c + cols[None, :], codes.to(tl.uint8), mask=tile_ok)
    tl.store(E_ptr + rows64[:, None] * stride_e + cols[None, :], E1, mask=tile_ok)
    row_error = tl.load(row_error_ptr + rows, mask=row_ok, other=0.0)
    tl.store(row_error_ptr + rows, row_error + tl.sum(E1 * E1, axis=1).to(tl.float64), mask=row_ok)


def column_batches(K: int, width: int, batch: int, static_groups: bool) -> list[tuple[int, int]]:
    """[i1, i2) column batches of at most `batch` columns, none straddling a dynamic group start
    except at its own first column: whole groups when width <= batch, else cut at group starts."""
    if static_groups:
        return [(i1, min(i1 + batch, K)) for i1 in range(0, K, batch)]
    if width <= batch:
        step = (batch // width) * width
        return [(i1, min(i1 + step, K)) for i1 in range(0, K, step)]
    bounds = []
    for start in range(0, K, width):
        end = min(start + width, K)
        bounds += [(i1, min(i1 + batch, end)) for i1 in range(start, end, batch)]
    return bounds


def quantize_column_batches(W: Tensor, U: Tensor, scales: Tensor, zeros: Tensor, group_of: Tensor,
                            bits: int, group_size: int, sym: bool, static_groups: bool,
                            column_batch: int) -> FusedColumns:
    """Algorithm 1's column loop on CUDA: W [N, K] (solve order) becomes Q in place.

    U [K, K] upper Cholesky factor of (H + λI)⁻¹ in solve order; scales, zeros [G, N] are read
    (static_groups) or filled; group_of [K] the group of each column in solve order.

    Raises:
        ScaleNotRepresentable: a group's scale exceeds float16's maximum.
    """
    N, K = W.shape
    width = K if group_size == -1 else group_size
    maxq = max_level(bits)
    fp64 = W.dtype == torch.float64
    # fp64 tiles take twice the registers: half the rows per program
    block_n = 8 if fp64 else 16
    magic, exact_above = (1.5 * 2.0**52, 2.0**51) if fp64 else (1.5 * 2.0**23, 2.0**22)
    batch = max(1, min(column_batch, BATCH_COLUMNS))
    E = torch.empty(N, BATCH_COLUMNS, dtype=W.dtype, device=W.device)  # scaled errors of one batch
    codes = torch.empty(N, K, dtype=torch.uint8, device=W.device)
    row_error = torch.zeros(N, dtype=torch.float64, device=W.device)
    group_of = group_of.to(torch.int32)
    grid_in_kernel = not static_groups and width <= batch
    launch = (triton.cdiv(N, block_n),)
    for i1, i2 in column_batches(K, width, batch, static_groups):
        if not static_groups and not grid_in_kernel and i1 % width == 0:
            # a wide group starts here: W[:, i1:] carries every update, so its grid is found from W as is
            grid = find_grid(W[:, i1:min(i1 + width, K)], bits, sym)
            scales[i1 // width], zeros[i1 // width] = grid.scale, grid.zero
        _column_batch_kernel[launch](
            W[:, i1:], U[i1:, i1:], E, codes[:, i1:], scales, zeros, group_of[i1:], row_error,
            N, i2 - i1, width, i1 // width, float(maxq), float((maxq + 1) // 2),
            W.stride(0), U.stride(0), E.stride(0), codes.stride(0), scales.stride(0),
            GRID_IN_KERNEL=grid_in_kernel, SYM=sym, MAGIC=magic, EXACT_ABOVE=exact_above,
            BLOCK_N=block_n, BLOCK_K=BATCH_COLUMNS, num_warps=4)
        if i2 < K:  # the lazy batch update of all later columns
            W[:, i2:].addmm_(E[:, :i2 - i1], U[i1:i2, i2:], alpha=-1)
    if grid_in_kernel:
        raise_if_scale_overflows(scales, bits)
    return FusedColumns(codes=codes, row_error=row_error)
