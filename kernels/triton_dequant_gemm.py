"""Triton w4a16 / w8a16 dequant-GEMM of GPTQ v1 packed weights; the same function as
`dequant_gemm_reference` for 4- and 8-bit, fp16 and bf16 activations, fp32 accumulation.

Layout trick: a qweight word holds PACK = 32/bits consecutive input channels k = PACK·w + j. A K step
loads BLOCK_KW whole words once and splits the dot product by j: Σ_k x[k]·W[k] = Σ_j Σ_w x[PACK·w+j]·W_j[w],
so every word is read once, with constant shifts (x is read with a stride of PACK channels, or regrouped
as [M, PACK, K/PACK] for the tensor-core kernels). Codes become floats without an int-to-float conversion
(a slow instruction on GPUs): the code is OR-ed into the mantissa of 2**p (1024 in fp16, 128 in bf16,
2**23 in fp32) and the same is done to the zero point, so their difference is the exact code - zero.

When g_idx is sequential (g_idx[k] = k // group_size, no act-order) and a K step lies inside one group,
the scale is applied once per step to the partial sums: the tensor cores see exact small integers.
Otherwise (act-order) each element gathers its group's scale and zero point (slower).

Kernels: `_dequant_gemv_kernel` (CUDA-core FMAs, one activation row per program, loads one K step ahead:
decode, M = 1), `_dequant_mm_kernel` (tl.dot, x·Wᵀ) and `_dequant_mm_swapped_kernel` (tl.dot, W·xᵀ).
Split-K programs write fp32 partial sums [split_k, M, N] that `_sum_splits_kernel` adds in split order, so
the output is deterministic (no atomics); tile configs come from a fixed table, not autotuning, for the same
reason. A fused reduction (the last program of each tile adds the partials, elected by an atomic counter) was
measured slower than this second launch on an H100 (4-bit 8192×28672, M = 16, split 4: 86.2 vs 77.8 µs), so
fewer splits, not fewer launches, is what the table tunes.
"""
import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from rayquant.kernels.dequant_gemm import GemmShapeMismatch
from rayquant.solver.pack import PackedLinear

TRITON_BITS = (4, 8)
TRITON_DTYPES = (torch.float16, torch.bfloat16)


class KernelUnsupported(ValueError):
    """The Triton kernel has no variant for these bits, dtype or devices."""


@dataclass(frozen=True)
class TileConfig:
    kernel: str      # "gemv": CUDA-core FMAs, a program per activation row (decode); "mma": tl.dot tiles;
                     # "mma_swapped": tl.dot computing outᵀ = W·xᵀ (weights on the MMA's wide side)
    block_m: int     # activation rows per program (mma; gemv always takes 1)
    block_n: int     # output channels per program
    block_kw: int    # packed words per K step (32/bits input channels each); mma needs >= 16
    split_k: int     # programs along K; more parallelism for small M, fp32 partials [split_k, M, N] summed
                     # by one extra launch
    num_warps: int
    num_stages: int  # software-pipelining depth of the K loop


@triton.jit
def _levels(codes, LEVEL: tl.constexpr):
    """Exact floats 2**p + codes, codes in [0, 2**bits): codes OR-ed into the mantissa of 2**p."""
    if LEVEL == 0:
        out = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)  # 1024 + codes (fp16)
    elif LEVEL == 1:
        out = (codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)  # 128 + codes (bf16, codes < 128)
    else:
        out = (codes | 0x4B000000).to(tl.float32, bitcast=True)  # 2**23 + codes (fp32)
    return out


@triton.jit
def _step_group(qzeros_ptr, scales_ptr, w0, w_end, words_per_group, stride_zg, stride_sg, rn, n_ok, zero_shift,
                BITS: tl.constexpr, PACK: tl.constexpr):
    """Scale and zero point (fp32) [BLOCK_N] of the one group of the K step starting at word w0."""
    MASK: tl.constexpr = (1 << BITS) - 1
    g = w0 // words_per_group
    ok = n_ok & (w0 < w_end)
    scale = tl.load(scales_ptr + g * stride_sg + rn, mask=ok, other=0).to(tl.float32)
    zero = ((tl.load(qzeros_ptr + g * stride_zg + rn // PACK, mask=ok, other=0) >> zero_shift) + 1) & MASK
    return scale, _levels(zero, 2) - 8388608.0


@triton.jit
def _dequant_gemv_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr,
                         N, K_words, words_per_group, words_per_split,
                         stride_xm, stride_xj, stride_xw, stride_qw, stride_zg, stride_sg, stride_os, stride_om,
                         BITS: tl.constexpr, PACK: tl.constexpr, SEQUENTIAL: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    zero_shift = (rn % PACK) * BITS
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    w_begin = pid_s * words_per_split
    w_end = tl.minimum(w_begin + words_per_split, K_words)
    # one step ahead: the loads of step i+1 are in flight while step i computes (a memory-bound loop)
    rw = w_begin + tl.arange(0, BLOCK_KW)
    words = tl.load(qweight_ptr + rw[:, None].to(tl.int64) * stride_qw + rn[None, :],
                    mask=(rw < w_end)[:, None] & n_ok[None, :], other=0)  # [BLOCK_KW, BLOCK_N] int32
    if SEQUENTIAL:
        scale, zero = _step_group(qzeros_ptr, scales_ptr, w_begin, w_end, words_per_group, stride_zg, stride_sg,
                                  rn, n_ok, zero_shift, BITS, PACK)
    else:  # unused
        scale = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for w0 in range(w_begin, w_end, BLOCK_KW):
        rw = w0 + tl.arange(0, BLOCK_KW)
        w_ok = rw < w_end
        rw_next = rw + BLOCK_KW
        words_next = tl.load(qweight_ptr + rw_next[:, None].to(tl.int64) * stride_qw + rn[None, :],
                             mask=(rw_next < w_end)[:, None] & n_ok[None, :], other=0)
        if SEQUENTIAL:
            scale_next, zero_next = _step_group(qzeros_ptr, scales_ptr, w0 + BLOCK_KW, w_end, words_per_group,
                                                stride_zg, stride_sg, rn, n_ok, zero_shift, BITS, PACK)
            # the whole step is one group: Σ x·(code - zero)·scale = (Σ x·code - zero·Σ x)·scale
            part = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
            x_sum = tl.zeros((BLOCK_KW,), dtype=tl.float32)
            for j in tl.static_range(PACK):
                xj = tl.load(x_row + j * stride_xj + rw * stride_xw, mask=w_ok, other=0).to(tl.float32)
                part += xj[:, None] * (_levels((words >> (j * BITS)) & MASK, 2) - 8388608.0)
                x_sum += xj
            acc += (part - x_sum[:, None] * zero[None, :]) * scale[None, :]
            scale = scale_next
            zero = zero_next
        else:  # act-order: every input channel gathers its own group's scale and zero point
            for j in tl.static_range(PACK):
                g = tl.load(g_idx_ptr + rw * PACK + j, mask=w_ok, other=0)
                gz_ok = w_ok[:, None] & n_ok[None, :]
                gscale = tl.load(scales_ptr + g[:, None] * stride_sg + rn[None, :], mask=gz_ok, other=0)
                gzero = ((tl.load(qzeros_ptr + g[:, None] * stride_zg + (rn // PACK)[None, :], mask=gz_ok, other=0)
                          >> zero_shift[None, :]) + 1) & MASK
                xj = tl.load(x_row + j * stride_xj + rw * stride_xw, mask=w_ok, other=0).to(tl.float32)
                wj = (_levels((words >> (j * BITS)) & MASK, 2) - _levels(gzero, 2)) * gscale.to(tl.float32)
                acc += xj[:, None] * wj
        words = words_next
    y = tl.sum(acc, axis=0)
    tl.store(out_ptr + pid_s * stride_os + m * stride_om + rn, y.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _dequant_mm_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr,
                       M, N, K_words, words_per_group, words_per_split,
                       stride_xm, stride_xj, stride_xw, stride_qw, stride_zg, stride_sg, stride_os, stride_om,
                       BITS: tl.constexpr, PACK: tl.constexpr, SEQUENTIAL: tl.constexpr, LEVEL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    MASK: tl.constexpr = (1 << BITS) - 1
    # M tiles vary fastest, so programs that share a weight tile run together and share it in L2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    dot_dtype = x_ptr.dtype.element_ty
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    zero_shift = (rn % PACK) * BITS
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_begin = pid_s * words_per_split
    w_end = tl.minimum(w_begin + words_per_split, K_words)
    for w0 in range(w_begin, w_end, BLOCK_KW):
        rw = w0 + tl.arange(0, BLOCK_KW)
        w_ok = rw < w_end
        words = tl.load(qweight_ptr + rw[:, None].to(tl.int64) * stride_qw + rn[None, :],
                        mask=w_ok[:, None] & n_ok[None, :], other=0)  # [BLOCK_KW, BLOCK_N] int32
        x_ok = m_ok[:, None] & w_ok[None, :]
        if SEQUENTIAL:  # integer levels on the tensor cores, scaled once per step
            g = w0 // words_per_group
            scale = tl.load(scales_ptr + g * stride_sg + rn, mask=n_ok, other=0).to(tl.float32)
            zero = ((tl.load(qzeros_ptr + g * stride_zg + rn // PACK, mask=n_ok, other=0) >> zero_shift) + 1) & MASK
            zero_level = _levels(zero, LEVEL)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(PACK):
                xj = tl.load(x_rows + j * stride_xj + rw[None, :] * stride_xw, mask=x_ok, other=0)
                wj = (_levels((words >> (j * BITS)) & MASK, LEVEL) - zero_level[None, :]).to(dot_dtype)
                part = tl.dot(xj, wj, part)
            acc += part * scale[None, :]
        else:  # act-order: dequantize each element with its own group, round to x's dtype, then dot
            for j in tl.static_range(PACK):
                g = tl.load(g_idx_ptr + rw * PACK + j, mask=w_ok, other=0)
                gz_ok = w_ok[:, None] & n_ok[None, :]
                scale = tl.load(scales_ptr + g[:, None] * stride_sg + rn[None, :], mask=gz_ok, other=0)
                zero = ((tl.load(qzeros_ptr + g[:, None] * stride_zg + (rn // PACK)[None, :], mask=gz_ok, other=0)
                         >> zero_shift[None, :]) + 1) & MASK
                wj = ((_levels((words >> (j * BITS)) & MASK, 2) - _levels(zero, 2)) * scale.to(tl.float32))
                xj = tl.load(x_rows + j * stride_xj + rw[None, :] * stride_xw, mask=x_ok, other=0)
                acc = tl.dot(xj, wj.to(dot_dtype), acc)
    out = out_ptr + pid_s * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequant_mm_swapped_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, out_ptr,
                               M, N, K_words, words_per_group, words_per_split,
                               stride_xm, stride_xj, stride_xw, stride_qw, stride_zg, stride_sg, stride_os, stride_om,
                               BITS: tl.constexpr, PACK: tl.constexpr, SEQUENTIAL: tl.constexpr,
                               LEVEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_KW: tl.constexpr):
    """_dequant_mm_kernel with the operands swapped, outᵀ = W·xᵀ: for few rows the weights are the MMA's
    wide (M) side, so BLOCK_N >= 64 fills the tensor-core tile and few activation rows fill the narrow one."""
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    dot_dtype = x_ptr.dtype.element_ty
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    zero_shift = (rn % PACK) * BITS
    x_cols = x_ptr + rm[None, :].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    w_begin = pid_s * words_per_split
    w_end = tl.minimum(w_begin + words_per_split, K_words)
    for w0 in range(w_begin, w_end, BLOCK_KW):
        rw = w0 + tl.arange(0, BLOCK_KW)
        w_ok = rw < w_end
        words = tl.load(qweight_ptr + rw[None, :].to(tl.int64) * stride_qw + rn[:, None],
                        mask=n_ok[:, None] & w_ok[None, :], other=0)  # [BLOCK_N, BLOCK_KW] int32
        x_ok = w_ok[:, None] & m_ok[None, :]
        if SEQUENTIAL:
            g = w0 // words_per_group
            scale = tl.load(scales_ptr + g * stride_sg + rn, mask=n_ok, other=0).to(tl.float32)
            zero = ((tl.load(qzeros_ptr + g * stride_zg + rn // PACK, mask=n_ok, other=0) >> zero_shift) + 1) & MASK
            zero_level = _levels(zero, LEVEL)
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for j in tl.static_range(PACK):
                xj = tl.load(x_cols + j * stride_xj + rw[:, None] * stride_xw, mask=x_ok, other=0)  # [KW, M]
                wj = (_levels((words >> (j * BITS)) & MASK, LEVEL) - zero_level[:, None]).to(dot_dtype)
                part = tl.dot(wj, xj, part)
            acc += part * scale[:, None]
        else:
            for j in tl.static_range(PACK):
                g = tl.load(g_idx_ptr + rw * PACK + j, mask=w_ok, other=0)
                gz_ok = n_ok[:, None] & w_ok[None, :]
                scale = tl.load(scales_ptr + g[None, :] * stride_sg + rn[:, None], mask=gz_ok, other=0)
                zero = ((tl.load(qzeros_ptr + g[None, :] * stride_zg + (rn // PACK)[:, None], mask=gz_ok, other=0)
                         >> zero_shift[:, None]) + 1) & MASK
                wj = ((_levels((words >> (j * BITS)) & MASK, 2) - _levels(zero, 2)) * scale.to(tl.float32))
                xj = tl.load(x_cols + j * stride_xj + rw[:, None] * stride_xw, mask=x_ok, other=0)
                acc = tl.dot(wj.to(dot_dtype), xj, acc)
    out = out_ptr + pid_s * stride_os + rm[None, :] * stride_om + rn[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out = Σ_s partial[s] in split order (deterministic); partial [SPLIT_K, M, N] fp32, out [M, N]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.load(partial_ptr + offs, mask=ok, other=0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(partial_ptr + s * numel + offs, mask=ok, other=0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class GIdxLayout:
    group_size: int | None  # w when g_idx[k] == k // w for every k (no act-order); None: act-order


def read_g_idx_layout(g_idx: Tensor) -> GIdxLayout:
    """Whether g_idx is sequential, and its group width; reads g_idx back to the host (two device syncs)."""
    width = int((g_idx == 0).sum())
    expected = torch.arange(g_idx.numel(), device=g_idx.device, dtype=g_idx.dtype) // max(width, 1)
    return GIdxLayout(width if width and torch.equal(g_idx, expected) else None)


@lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's CPU interpreter (tests): any count works
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_tile_config(M: int, N: int, K: int, bits: int, sm_count: int) -> TileConfig:
    """The fixed tile table (tuned on an H100): gemv for one row, tensor cores for more; split K until the
    grid has target_programs programs, keeping >= 4 K steps per program.

    Measured there (`python tests/bench/kernel_bench.py --splits`, two-kernel reduction, CUDA graphs,
    8192×28672 g128; % of the copy bandwidth): 4-bit M = 4 mma_swapped split 4 74.5 µs (54.6 %) against
    split 8 77.5; M = 16 split 4 77.8 µs (52.3 %) against split 8 82.5. 8-bit M = 4 mma split 2 91.6-92.0 µs
    (87 %) against split 8 98-99.8; M = 16 split 2 93.5 µs (85.6 %) against split 8 105.8. M = 64 mma split 1
    169.5 / 143.3 µs (4 / 8-bit) against split 2 177 / 159. More splits add partial traffic and a longer
    second launch faster than they hide latency; gemv (M = 1) keeps 8 programs per SM.
    """
    pack = 32 // bits
    kw = 128 // pack  # words per 128 input channels: one g128 group per K step
    if M <= 1:
        cfg = TileConfig("gemv", 1, 64 if bits == 4 else 128, kw, 1, 4, 1)
        target_programs = 8 * sm_count
    elif M <= 16:
        cfg = TileConfig("mma_swapped" if bits == 4 else "mma", 16, 128, kw, 1, 4, 3)
        target_programs = (4 if bits == 4 else 2) * sm_count
    elif M <= 64:
        cfg = TileConfig("mma", 64, 128, kw, 1, 4, 3)
        target_programs = sm_count
    else:
        cfg = TileConfig("mma", 128, 128, kw, 1, 8, 3)
        target_programs = 2 * sm_count
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    k_steps = triton.cdiv(K // pack, cfg.block_kw)
    split_k = 1
    while tiles * split_k < target_programs and split_k * 2 * 4 <= k_steps:
        split_k *= 2
    return TileConfig(cfg.kernel, cfg.block_m, cfg.block_n, cfg.block_kw, split_k, cfg.num_warps, cfg.num_stages)


def dequant_gemm_triton(x: Tensor, packed: PackedLinear, bits: int, g_idx_layout: GIdxLayout | None = None,
                        tile_config: TileConfig | None = None) -> Tensor:
    """x [..., K] @ W.T -> [..., N] in x's dtype, W dequantized from the packed tensors; fp32 accumulation.

    g_idx_layout: `read_g_idx_layout(packed.g_idx)`, which None computes on every call (device syncs): pass it
    to capture the call in a CUDA graph; a wrong one gives wrong results. tile_config: None takes
    `choose_tile_config`'s.

    Raises:
        GemmShapeMismatch: x's last dimension is not the layer's in_features.
        KernelUnsupported: bits not 4 or 8, x not float16/bfloat16, or tensors on different devices.
    """
    in_features = packed.g_idx.numel()
    out_features = packed.scales.shape[1]
    if x.shape[-1] != in_features:
        raise GemmShapeMismatch(
            f"activations of shape {tuple(x.shape)} do not fit a packed layer with in_features="
            f"{in_features}: pass x [M, {in_features}]")
    if bits not in TRITON_BITS or x.dtype not in TRITON_DTYPES:
        raise KernelUnsupported(
            f"the Triton dequant-GEMM takes bits in {TRITON_BITS} and float16/bfloat16 activations, got "
            f"bits={bits}, x {x.dtype}: call rayquant.kernels.dequant_gemm.dequant_gemm, which uses the "
            "reference for the rest")
    tensors = (packed.qweight, packed.qzeros, packed.scales, packed.g_idx)
    if any(t.device != x.device for t in tensors):
        raise KernelUnsupported(
            f"x is on {x.device} but the packed tensors are on {[str(t.device) for t in tensors]}: "
            "move the packed layer to the activations' device")
    pack = 32 // bits
    K_words = in_features // pack
    if packed.qweight.shape != (K_words, out_features) or packed.scales.dtype != torch.float16:
        raise GemmShapeMismatch(
            f"qweight {tuple(packed.qweight.shape)} / scales {packed.scales.dtype} do not form a {bits}-bit "
            f"GPTQ layer with in_features={in_features}, out_features={out_features}: expected qweight "
            f"[{K_words}, {out_features}] and float16 scales; check the bits the layer was packed with")

    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    M = x2.shape[0]
    out = torch.empty((M, out_features), device=x.device, dtype=x.dtype)
    if M == 0:
        return out.reshape(*lead, out_features)
    cfg = tile_config or choose_tile_config(M, out_features, in_features, bits, _sm_count(x.device))
    group_size = (g_idx_layout or read_g_idx_layout(packed.g_idx)).group_size
    if group_size is not None and group_size % pack == 0:
        # groups narrower than a K step (g32, g64): shorter steps keep the one-group-per-step path, down to
        # tl.dot's 16 (4-bit g32/g64 and 8-bit g32 on the tensor cores take the gathering path)
        min_kw = 1 if cfg.kernel == "gemv" else 16
        while cfg.block_kw > min_kw and (group_size // pack) % cfg.block_kw:
            cfg = dataclasses.replace(cfg, block_kw=cfg.block_kw // 2)
    sequential = group_size is not None and group_size % (cfg.block_kw * pack) == 0
    words_per_group = group_size // pack if sequential else 1

    if cfg.kernel == "gemv":  # one row: read x in place with a stride of PACK channels
        x_strides = (x2.stride(0), x2.stride(1), pack * x2.stride(1))
    else:  # channels regrouped by their place j in a word, [M, PACK, K_words], so x_j tiles load contiguously
        x2 = x2.reshape(M, K_words, pack).transpose(1, 2).contiguous()
        x_strides = (x2.stride(0), x2.stride(1), x2.stride(2))
    words_per_split = triton.cdiv(triton.cdiv(K_words, cfg.split_k), cfg.block_kw) * cfg.block_kw
    split_k = triton.cdiv(K_words, words_per_split)
    if split_k > 1:
        dest = torch.empty((split_k, M, out_features), device=x.device, dtype=torch.float32)
        stride_os = dest.stride(0)
    else:
        dest, stride_os = out, 0
    args = (x2, packed.qweight, packed.qzeros, packed.scales, packed.g_idx, dest)
    strides = (*x_strides, packed.qweight.stride(0), packed.qzeros.stride(0), packed.scales.stride(0),
               stride_os, dest.stride(-2))
    if packed.qweight.stride(1) != 1 or packed.qzeros.stride(1) != 1 or packed.scales.stride(1) != 1:
        raise KernelUnsupported("qweight, qzeros and scales must be contiguous along out_features: pass "
                                "tensors as stored in the checkpoint (or .contiguous() them)")
    if cfg.kernel == "gemv":
        grid = (triton.cdiv(out_features, cfg.block_n), split_k, M)
        _dequant_gemv_kernel[grid](*args, out_features, K_words, words_per_group, words_per_split, *strides,
                                   BITS=bits, PACK=pack, SEQUENTIAL=sequential, BLOCK_N=cfg.block_n,
                                   BLOCK_KW=cfg.block_kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        # exact integer levels in x's dtype: fp16 holds 1024 + code, bf16 128 + code (4-bit), else fp32
        level = 0 if x.dtype == torch.float16 else (1 if bits == 4 else 2)
        if cfg.kernel == "mma_swapped":
            grid = (triton.cdiv(out_features, cfg.block_n), split_k, triton.cdiv(M, cfg.block_m))
            kernel = _dequant_mm_swapped_kernel
        else:
            grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(out_features, cfg.block_n), split_k)
            kernel = _dequant_mm_kernel
        kernel[grid](*args, M, out_features, K_words, words_per_group, words_per_split, *strides,
                     BITS=bits, PACK=pack, SEQUENTIAL=sequential, LEVEL=level, BLOCK_M=cfg.block_m,
                     BLOCK_N=cfg.block_n, BLOCK_KW=cfg.block_kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split_k > 1:
        numel = M * out_features
        _sum_splits_kernel[(triton.cdiv(numel, 1024),)](dest, out, numel, SPLIT_K=split_k, BLOCK=1024)
    return out.reshape(*lead, out_features)
