"""Σ xᵀx of bf16/fp16 activations into an fp32 `hessian_sum` in one Triton kernel: the tensor-core path of
`solver/hessian.py` with HESSIAN_KERNEL = "triton".

Why a kernel of its own: Hopper's tensor cores accumulate fp32 less exactly than IEEE over long sums (the
relative error of one cuBLAS product grows with its token count, ~2e-6 at 2048 tokens, 4.5e-5 at 16384),
so the cuBLAS path cuts the tokens into short products, each added into hessian_sum by the GEMM epilogue,
and short products run far below the tensor cores' rate. Here each program keeps two accumulators of its
TILE × TILE output tile, as DeepGEMM does for FP8: tl.dot accumulates CHUNK_TOKENS tokens on the tensor
cores, then that partial sum is added into an outer fp32 accumulator with ordinary IEEE adds; the outer one
is added into hessian_sum once per call (read, add, write: tiles are disjoint, so no atomics and the
result is deterministic). One pass over all of the call's tokens, with the accuracy of short chains.

Which tiles: xᵀx is symmetric, so only tiles (i, j) with j >= i are multiplied (square tiles, i and j in
tile units): about half of K² (the cuBLAS path's whole 4096-blocks on and above the diagonal are 75 % of it at
K = 8192, 62 % at 16384, 57 % at 28672). `hessian.mirror_upper` later copies the HESSIAN_BLOCK-wide blocks
above the diagonal below it; a diagonal HESSIAN_BLOCK itself must be complete after every call, so a tile
above the diagonal inside one also writes its transpose below the diagonal. Blocks below the diagonal are
left stale, as on the cuBLAS path. Programs are ordered in groups of GROUP_TILES tile rows, so programs
running at the same time read the same column strips of x from L2.

x is row-major [T, K] and read by TMA (no address registers, so both accumulators fit in registers): the
dot's A operand is the transpose of a [STEP_TOKENS, TILE] box. Tile sizes are
fixed module constants (no autotuning: the summation order, hence the result, is the same on every run).
This module imports triton: import it only where CUDA and triton are present (`solver/hessian.py` does
so lazily).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

TILE = 128           # rows = columns of hessian_sum per program; must divide hessian.HESSIAN_BLOCK
STEP_TOKENS = 64     # tokens per tl.dot (the MMA's inner dimension)
CHUNK_TOKENS = 512   # tokens summed on the tensor cores before an IEEE add into the outer accumulator:
                     # shorter is more exact (chains of 1024-2048 measured ~2e-6), longer has fewer adds
NUM_WARPS = 8        # 8 warps hold the two 128×128 fp32 accumulators in registers (128 per thread)
NUM_STAGES = 4       # software-pipelining depth of the token loop (4: 0.56 s per 70B block, 3: 0.60 s)
GROUP_TILES = 8      # tile rows per program group (L2 reuse of x's column strips)


@triton.jit
def _xtx_tiles_kernel(x_desc, h_ptr, tile_i_ptr, tile_j_ptr, T, K, stride_h,
                      TILE: tl.constexpr, STEP_TOKENS: tl.constexpr, CHUNK_TOKENS: tl.constexpr,
                      BLOCK_TILES: tl.constexpr, EVEN_K: tl.constexpr):
    """h[I, J] += x[:, I]ᵀ x[:, J] for this program's tile pair (I, J) (I = J: its upper triangle, mirrored);
    also h[J, I] = h[I, J]ᵀ when I ≠ J lie in one diagonal HESSIAN_BLOCK (BLOCK_TILES tiles wide).
    x_desc: a TMA descriptor of x [T, K] in [STEP_TOKENS, TILE] boxes; its zeros past T and K stand in for masks."""
    pid = tl.program_id(0)
    ti = tl.load(tile_i_ptr + pid)
    tj = tl.load(tile_j_ptr + pid)
    acc = tl.zeros((TILE, TILE), dtype=tl.float32)
    # flatten: one software-pipelined loop, so loads run ahead across chunk boundaries; that needs a fixed
    # trip count inside, so the last chunk runs past T on the descriptor's zeros
    for chunk in tl.range(0, T, CHUNK_TOKENS, flatten=True):
        # the tensor cores' accumulator only ever sums CHUNK_TOKENS tokens
        part = tl.zeros((TILE, TILE), dtype=tl.float32)
        for step in range(0, CHUNK_TOKENS, STEP_TOKENS):
            a = x_desc.load([chunk + step, ti * TILE])  # [STEP_TOKENS, TILE]
            b = x_desc.load([chunk + step, tj * TILE])
            part = tl.dot(tl.trans(a), b, part)
        acc += part
    rows = (ti * TILE + tl.arange(0, TILE)).to(tl.int64)
    cols = (tj * TILE + tl.arange(0, TILE)).to(tl.int64)
    h_ptrs = h_ptr + rows[:, None] * stride_h + cols[None, :]
    if EVEN_K:
        new = tl.load(h_ptrs) + acc
    else:
        new = tl.load(h_ptrs, mask=(rows[:, None] < K) & (cols[None, :] < K), other=0.0) + acc
    if ti == tj:
        # nothing makes the tensor cores sum x[:, r]·x[:, c] and x[:, c]·x[:, r] in one order: the tile's upper
        # triangle is mirrored, so hessian_sum stays symmetric bit for bit
        new = tl.where(rows[:, None] <= cols[None, :], new, tl.trans(new))
    if EVEN_K:
        tl.store(h_ptrs, new)
    else:
        tl.store(h_ptrs, new, mask=(rows[:, None] < K) & (cols[None, :] < K))
    if (ti != tj) & (ti // BLOCK_TILES == tj // BLOCK_TILES):
        lower_ptrs = h_ptr + cols[:, None] * stride_h + rows[None, :]
        if EVEN_K:
            tl.store(lower_ptrs, tl.trans(new))
        else:
            tl.store(lower_ptrs, tl.trans(new), mask=(cols[:, None] < K) & (rows[None, :] < K))


_TILE_PAIRS: dict[tuple, tuple[Tensor, Tensor]] = {}


def upper_tile_pairs(n_tiles: int, group_tiles: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(tile_i, tile_j) int32 [P] for every tile pair j >= i of an n_tiles × n_tiles grid, in launch order:
    groups of group_tiles tile rows; inside a group column by column, each column's rows top to bottom."""
    key = (n_tiles, group_tiles, device)
    if key not in _TILE_PAIRS:
        pairs = [(i, j) for g in range(0, n_tiles, group_tiles) for j in range(g, n_tiles)
                 for i in range(g, min(g + group_tiles, j + 1))]
        table = torch.tensor(pairs, dtype=torch.int32).T.contiguous().to(device)
        _TILE_PAIRS[key] = (table[0], table[1])
    return _TILE_PAIRS[key]


def accumulate_upper_triton(hessian_sum: Tensor, rows: Tensor, hessian_block: int) -> None:
    """hessian_sum [K, K] fp32 += rowsᵀ rows for bf16/fp16 rows [T, K]: every tile on and above the diagonal,
    and the lower half of each diagonal hessian_block-wide block (`mirror_upper` completes the rest)."""
    T, K = rows.shape
    if T == 0:
        return
    if hessian_block % TILE or CHUNK_TOKENS % STEP_TOKENS:
        raise ValueError(f"TILE={TILE} must divide the mirrored block width {hessian_block}, and STEP_TOKENS="
                         f"{STEP_TOKENS} divide CHUNK_TOKENS={CHUNK_TOKENS}")
    if hessian_sum.stride(1) != 1:
        raise ValueError(f"hessian_sum must have unit column stride, got strides {hessian_sum.stride()}")
    if rows.stride(1) != 1 or (rows.stride(0) * rows.element_size()) % 16 or rows.data_ptr() % 16:
        # TMA wants 16-byte aligned rows: zero columns past K add nothing to the tiles inside K
        padded = rows.new_zeros(T, K + -K % 8)
        padded[:, :K] = rows
        rows = padded
    x_desc = TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [STEP_TOKENS, TILE])
    tile_i, tile_j = upper_tile_pairs(triton.cdiv(K, TILE), GROUP_TILES, rows.device)
    _xtx_tiles_kernel[(tile_i.numel(),)](
        x_desc, hessian_sum, tile_i, tile_j, T, K, hessian_sum.stride(0),
        TILE=TILE, STEP_TOKENS=STEP_TOKENS, CHUNK_TOKENS=CHUNK_TOKENS, BLOCK_TILES=hessian_block // TILE,
        EVEN_K=K % TILE == 0, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
