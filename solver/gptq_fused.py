"""The column loop of GPTQ (Frantar et al., 2022, Algorithm 1) with each column batch fused into one
Triton kernel: the CUDA path of `solver/gptq.py`, the same algorithm as its torch loop.

Section 3, Step 2 "Lazy Batch-Updates": inside a column batch every column updates the later columns
of the batch at once (a rank-1 update per column); the rest of W receives the batch's update in one
matrix product afterwards. The torch loop spends ~10 launches per column on the first part; here one
program owns a tile of rows × the whole batch in registers and walks its columns:

    for each column j of the batch (solve order):
        at a group start: the group's grid from the tile's current (error-updated) columns
        q = clamp(round(w_j / scale) + zero, 0, maxq);  Q_j = (q - zero) · scale
        E_j = (w_j - Q_j) / U[j, j]                       (Eq. 2, Cholesky form, Section 3 Step 3)
        w_{j+1..} -= E_j · U[j, j+1..]                     (within the batch only)

Rows are independent, so programs never talk to each other. The kernel writes the codes, the
batch's final errors D = W - Q and per row Σ E_j² and Σ D_j².

Working from R instead of U. U, the upper Cholesky factor of (H + λI)⁻¹, is R⁻¹ for the upper R with
H + λI = R Rᵀ, which one Cholesky gives (`gptq._cholesky_factors`); forming U would cost a K×K triangular
inverse (2/3 of the factorization time at K = 28672). The torch loop moves later columns by
-E[:, :i1] U[:i1, b]; since D[:, :i1] = E[:, :i1] U[:i1, :i1] and U[:i1, b] = -U[:i1, :i1] R[:i1, b] U[b, b]
for a batch b = [i1, i2) (U upper), that is the same as

    W_current[:, b] = W[:, b] + Z[:, b] · U[b, b],   Z[:, b] = D[:, :i1] R[:i1, b],  U[b, b] = R[b, b]⁻¹

so Z is accumulated batch by batch with the same product shape as the lazy update (Z[:, i2:] +=
D[:, b] R[b, i2:]) and only the 128×128 diagonal blocks of R are inverted. The loss comes from the sums:
W - Q = E U and U (H + λI) Uᵀ = I give tr((W - Q) H (W - Q)ᵀ) = ‖E‖² - λ‖W - Q‖², O(NK) instead of an
[N, K] × [K, K] product.

Groups: a batch never straddles a group start except at its own first column. When groups fit in a
batch (group width <= batch width), batches hold whole groups and the kernel finds each grid at the
group's first column, from columns that already carry every earlier update (the textbook's rule).
Wider groups start at a batch start; their grid comes from `grid.find_grid` on the group's current
columns before the launch. Static grids are given; the kernel reads a grid per column.

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
from rayquant.solver.split_matmul import addmm_split_

BATCH_COLUMNS = 128   # columns per kernel launch: the register tile width (the paper's B)
UPDATE_COLUMNS = 512  # columns whose errors update all later columns in one product: a longer inner
                      # dimension than one batch's 128 halves the product's memory traffic per flop
BLOCK_ROWS = 16       # rows per program (fp32; fp64 takes half): 16 × 128 fp32 tile, ~150 registers
# the lazy update's product (most of the solve's flops) on the tensor cores from split fp32 operands,
# ~2⁻²¹ relative (`solver/split_matmul.py`); "fp32" runs it on the CUDA cores. fp64 solves are never split.
LAZY_UPDATE_PRECISION = "tf32x3"


@dataclass(frozen=True)
class FusedColumns:
    codes: Tensor     # [E, N, K] uint8 integer levels, solve order
    row_loss: Tensor  # [E, N] float64 Σ_j E_j² - λ Σ_j D_j² per row: tr((W - Q) H (W - Q)ᵀ) of each row


@triton.jit
def _div(x, y, FP64: tl.constexpr):
    # IEEE division, as torch's: Triton's fp32 `/` is approximate (div.full.f32); fp64 `/` is exact
    if FP64:
        quotient = x / y
    else:
        quotient = tl.math.div_rn(x, y)
    return quotient


@triton.jit
def _round_half_even(x, FP64: tl.constexpr):
    # (x + 1.5·2^m) - 1.5·2^m rounds to an integer with the FPU's round-half-even, as torch.round does,
    # m the mantissa width; |x| >= 2^(m-1) is integral already or clamped to 0 / maxq by the caller
    if FP64:
        rounded = tl.where(tl.abs(x) < 2.0**51, (x + 6755399441055744.0) - 6755399441055744.0, x)
    else:
        rounded = tl.where(tl.abs(x) < 4194304.0, (x + 12582912.0) - 12582912.0, x)
    return rounded


@triton.jit
def _float16_scale(scale):
    # grid._float16_scale: clamp to 2^-24, round to float16 (through float32, as torch's cast does);
    # a scale beyond float16's 65504 is kept raw, for the host to report (ScaleNotRepresentable)
    rounded = tl.maximum(scale, 5.9604644775390625e-08).to(tl.float32).to(tl.float16).to(scale.dtype)
    return tl.where(scale > 65504.0, scale, rounded)


@triton.jit
def _find_grid(xmin, xmax, MAXQ: tl.constexpr, SYM: tl.constexpr, FP64: tl.constexpr):
    # grid.find_grid, per row: the range includes 0, an all-zero row gets [-1, 1]
    xmin = tl.minimum(xmin, 0.0)
    xmax = tl.maximum(xmax, 0.0)
    if SYM:
        xmax = tl.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0.0) & (xmax == 0.0)
    xmin = tl.where(empty, -1.0, xmin)
    xmax = tl.where(empty, 1.0, xmax)
    scale = _float16_scale(_div(xmax - xmin, tl.zeros_like(xmax) + MAXQ, FP64))
    if SYM:
        zero = tl.zeros_like(scale) + (MAXQ + 1) // 2
    else:
        zero = _round_half_even(_div(-xmin, scale, FP64), FP64)
        # GPTQ v1 stores zero - 1: zero point 0 becomes 1 with levels up to (maxq - 1) · scale' >= xmax
        below_one = zero < 1.0
        scale = tl.where(below_one, _float16_scale(_div(xmax, tl.zeros_like(xmax) + (MAXQ - 1), FP64)), scale)
        zero = tl.where(below_one, 1.0, zero)
        zero = tl.minimum(zero, MAXQ)
    return scale, zero


@triton.jit
def _column_batch_kernel(
        Wc_ptr, W_ptr, U_ptr, D_ptr, codes_ptr, scales_ptr, zeros_ptr, group_ptr, e2_ptr, d2_ptr,
        N, n_cols, width, first_group,
        stride_wc, stride_w, stride_u, stride_d, stride_c, stride_g,
        problem_wc, problem_w, problem_u, problem_d, problem_c, problem_g, problem_group,
        MAXQ: tl.constexpr, GRID_IN_KERNEL: tl.constexpr, SYM: tl.constexpr, FP64: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One column batch for BLOCK_N rows of problem program_id(1): Wc the batch's current weights, W its
    original ones (both [N, n_cols] with their row strides), U the batch's diagonal block of U; W_ptr,
    codes_ptr and group_ptr point at the batch's first column; scales/zeros are [G, N] with row stride
    stride_g. Each problem's tensors start problem_* elements after the previous one's; e2/d2 are [E, N]."""
    problem = tl.program_id(1).to(tl.int64)
    Wc_ptr += problem * problem_wc
    W_ptr += problem * problem_w
    U_ptr += problem * problem_u
    D_ptr += problem * problem_d
    codes_ptr += problem * problem_c
    scales_ptr += problem * problem_g
    zeros_ptr += problem * problem_g
    group_ptr += problem * problem_group
    e2_ptr += problem * N
    d2_ptr += problem * N
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    col_ok = cols < n_cols
    tile_ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    W1 = tl.load(Wc_ptr + rows64[:, None] * stride_wc + cols[None, :], mask=tile_ok, other=0.0)  # [BLOCK_N, BLOCK_K]
    codes = tl.zeros([BLOCK_N, BLOCK_K], dtype=W1.dtype)
    e2 = tl.zeros([BLOCK_N], dtype=W1.dtype)
    scale = tl.zeros([BLOCK_N], dtype=W1.dtype) + 1.0
    zero = tl.zeros([BLOCK_N], dtype=W1.dtype)
    for i in range(0, n_cols):
        if GRID_IN_KERNEL:
            if i % width == 0:  # a group starts: its columns [i, i + width) carry every earlier update
                in_group = (cols >= i) & (cols < i + width) & col_ok
                xmin = tl.min(tl.where(in_group[None, :], W1, float("inf")), axis=1)
                xmax = tl.max(tl.where(in_group[None, :], W1, float("-inf")), axis=1)
                scale, zero = _find_grid(xmin, xmax, MAXQ, SYM, FP64)
                group = first_group + i // width
                tl.store(scales_ptr + group * stride_g + rows, scale, mask=row_ok)
                tl.store(zeros_ptr + group * stride_g + rows, zero, mask=row_ok)
        else:
            group = tl.load(group_ptr + i)
            scale = tl.load(scales_ptr + group * stride_g + rows, mask=row_ok, other=1.0)
            zero = tl.load(zeros_ptr + group * stride_g + rows, mask=row_ok, other=0.0)
        is_i = (cols == i)[None, :]
        w = tl.sum(tl.where(is_i, W1, 0.0), axis=1)
        q = tl.minimum(tl.maximum(_round_half_even(_div(w, scale, FP64), FP64) + zero, 0.0), MAXQ)
        dq = (q - zero) * scale
        err = _div(w - dq, tl.zeros_like(w) + tl.load(U_ptr + i * stride_u + i), FP64)
        # U[j, j+1..], loaded as a tile in W1's own layout (every row the same): no shuffle through shared memory
        later = tl.broadcast_to(((cols > i) & col_ok)[None, :], [BLOCK_N, BLOCK_K])
        u = tl.load(U_ptr + i * stride_u + tl.broadcast_to(cols[None, :], [BLOCK_N, BLOCK_K]), mask=later, other=0.0)
        W1 = tl.where(is_i, dq[:, None], W1 - err[:, None] * u)
        codes = tl.where(is_i, q[:, None], codes)
        e2 += err * err
    # every column of W1 now holds its Q
    D = tl.load(W_ptr + rows64[:, None] * stride_w + cols[None, :], mask=tile_ok, other=0.0) - W1
    tl.store(D_ptr + rows64[:, None] * stride_d + cols[None, :], D, mask=tile_ok)
    tl.store(codes_ptr + rows64[:, None] * stride_c + cols[None, :], codes.to(tl.uint8), mask=tile_ok)
    tl.store(e2_ptr + rows, tl.load(e2_ptr + rows, mask=row_ok, other=0.0) + e2.to(tl.float64), mask=row_ok)
    d2 = tl.sum(D * D, axis=1).to(tl.float64)
    tl.store(d2_ptr + rows, tl.load(d2_ptr + rows, mask=row_ok, other=0.0) + d2, mask=row_ok)


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


def update_spans(batches: list[tuple[int, int]], update_columns: int, wide_width: int) -> list[list[tuple[int, int]]]:
    """Consecutive batches grouped into spans of at most update_columns columns (one batch at least),
    a new span at every multiple of wide_width (0: none)."""
    spans: list[list[tuple[int, int]]] = []
    for i1, i2 in batches:
        if spans and i2 - spans[-1][0][0] <= update_columns and not (wide_width and i1 % wide_width == 0):
            spans[-1].append((i1, i2))
        else:
            spans.append([(i1, i2)])
    return spans


def quantize_column_batches(W: Tensor, R: Tensor, damping: list[float], scales: Tensor, zeros: Tensor,
                            group_of: Tensor, bits: int, group_size: int, sym: bool, static_groups: bool,
                            column_batch: int) -> FusedColumns:
    """Algorithm 1's column loop on CUDA for a batch of E problems (MoE experts), W [E, N, K] in solve
    order (read only): one launch per column batch covers every problem's rows.

    R [E, K, K] upper with H + λI = R Rᵀ in solve order (λ = damping[e]); scales, zeros [E, G, N] are
    read (static_groups) or filled; group_of [E, K] the group of each column in solve order.

    Raises:
        ScaleNotRepresentable: a group's scale exceeds float16's maximum.
    """
    E, N, K = W.shape
    W = W.contiguous()  # the kernel reads rows of W
    width = K if group_size == -1 else group_size
    batch = max(1, min(column_batch, BATCH_COLUMNS))
    grid_in_kernel = not static_groups and width <= batch
    batches = column_batches(K, width, batch, static_groups)
    # wide groups find their grid from Z at their start: every earlier update must have reached it
    spans = update_spans(batches, UPDATE_COLUMNS, width if not static_groups and not grid_in_kernel else 0)
    Z = torch.zeros_like(W)  # Z[:, j] = D[:, :i1] R[:i1, j]: columns < i1 moved column j by Z[:, j] U[j, j]
    D = torch.empty(E, N, max(UPDATE_COLUMNS, BATCH_COLUMNS), dtype=W.dtype, device=W.device)  # W - Q of one span
    current = torch.empty(E, N, BATCH_COLUMNS, dtype=W.dtype, device=W.device)
    eye = torch.eye(BATCH_COLUMNS, dtype=W.dtype, device=W.device)
    codes = torch.empty(E, N, K, dtype=torch.uint8, device=W.device)
    e2 = torch.zeros(E, N, dtype=torch.float64, device=W.device)
    d2 = torch.zeros(E, N, dtype=torch.float64, device=W.device)
    group_of = group_of.to(torch.int32).contiguous()
    # fp64 tiles take twice the registers: half the rows per program
    block_n = BLOCK_ROWS // 2 if W.dtype == torch.float64 else BLOCK_ROWS
    launch = (triton.cdiv(N, block_n), E)
    for span in spans:
        s1, s2 = span[0][0], span[-1][1]
        for i1, i2 in span:
            B = i2 - i1
            if i1 > s1:  # the span's earlier batches, not yet in Z
                _addmm_each(Z[:, :, i1:i2], D[:, :, :i1 - s1], R[:, s1:i1, i1:i2])
            U_bb = torch.linalg.solve_triangular(R[:, i1:i2, i1:i2], eye[:B, :B], upper=True).contiguous()  # U[b, b]
            if i1 == 0:
                W_b = W[:, :, :i2]  # nothing moved these columns yet
            else:
                W_b = current[:, :, :B]
                W_b.copy_(W[:, :, i1:i2])
                _addmm_each(W_b, Z[:, :, i1:i2], U_bb)
            if not static_groups and not grid_in_kernel and i1 % width == 0:
                # a wide group starts here: its columns move by Z[:, group] R[group, group]⁻¹ (as W_b does)
                end = min(i1 + width, K)
                group = W[:, :, i1:end]
                if i1 > 0:
                    group = group + torch.linalg.solve_triangular(R[:, i1:end, i1:end], Z[:, :, i1:end], upper=True,
                                                                  left=False)
                grid = find_grid(group, bits, sym)
                scales[:, i1 // width], zeros[:, i1 // width] = grid.scale, grid.zero
            D_b = D[:, :, i1 - s1:]
            _column_batch_kernel[launch](
                W_b, W[:, :, i1:], U_bb, D_b, codes[:, :, i1:], scales, zeros, group_of[:, i1:], e2, d2,
                N, B, width, i1 // width,
                W_b.stride(1), W.stride(1), U_bb.stride(1), D_b.stride(1), codes.stride(1), scales.stride(1),
                W_b.stride(0), W.stride(0), U_bb.stride(0), D_b.stride(0), codes.stride(0), scales.stride(0),
                group_of.stride(0),
                MAXQ=max_level(bits), GRID_IN_KERNEL=grid_in_kernel, SYM=sym, FP64=W.dtype == torch.float64,
                BLOCK_N=block_n, BLOCK_K=BATCH_COLUMNS, num_warps=4)
        if s2 < K:  # the lazy update of all later columns by the span's errors
            addmm_split_(Z[:, :, s2:], D[:, :, :s2 - s1], R[:, s1:s2, s2:], LAZY_UPDATE_PRECISION)
    if grid_in_kernel:
        raise_if_scale_overflows(scales, bits)
    damping_t = torch.tensor(damping, dtype=torch.float64, device=W.device)[:, None]
    return FusedColumns(codes=codes, row_loss=e2 - damping_t * d2)


def _addmm_each(out: Tensor, A: Tensor, B: Tensor) -> None:
    """out[e] += A[e] @ B[e] for every problem e: one batched product, a plain one for a single problem."""
    if out.shape[0] == 1:
        out[0].addmm_(A[0], B[0])
    else:
        out.baddbmm_(A, B)
