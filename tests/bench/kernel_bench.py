"""Triton dequant-GEMM against the GPU's copy bandwidth and torch's fp16 matmul, on one CUDA GPU.

    python tests/bench/kernel_bench.py [--sweep] [--large-m]

Measures a 1 GiB device-to-device copy (bytes read + written) in the same run, then for 4- and 8-bit
GPTQ layers (g128) with K×N in {8192×28672, 28672×8192, 8192×8192} and M in {1, 4, 16, 128} the kernel's
median time (triton.testing.do_bench: CUDA events, L2 flushed before each run), its effective weight
bandwidth (qweight + scales + qzeros bytes / time) as GB/s and as % of the copy bandwidth, and
torch.nn.functional.linear on an fp16 weight of the same shape. Act-order (g_idx permuted) rows follow.
--large-m adds M = 512, 2048 rows. The table is printed last.
--sweep instead times alternative tile configs at M = 1, 4, 16 (for tuning `choose_tile_config`).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from rayquant.kernels.triton_dequant_gemm import TileConfig, choose_tile_config, dequant_gemm_triton
from rayquant.solver.pack import PackedLinear

SHAPES = [(8192, 28672), (28672, 8192), (8192, 8192)]  # (K, N): MLP up, MLP down, attention (70B)
GROUP_SIZE = 128


def random_layer(K: int, N: int, bits: int, act_order: bool, seed: int) -> PackedLinear:
    """Random packed words (any int32 word is a valid code vector) on the GPU; g128."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pack = 32 // bits
    G = K // GROUP_SIZE
    g_idx = torch.arange(K, device="cuda", dtype=torch.int32) // GROUP_SIZE
    if act_order:
        g_idx = g_idx[torch.randperm(K, device="cuda", generator=gen)]
    return PackedLinear(
        qweight=torch.randint(-2**31, 2**31 - 1, (K // pack, N), device="cuda", dtype=torch.int32, generator=gen),
        qzeros=torch.randint(-2**31, 2**31 - 1, (G, N // pack), device="cuda", dtype=torch.int32, generator=gen),
        scales=(torch.rand(G, N, device="cuda", generator=gen) * 1e-2 + 1e-3).half(),
        g_idx=g_idx)


def weight_bytes(p: PackedLinear) -> int:
    return sum(t.numel() * t.element_size() for t in (p.qweight, p.scales, p.qzeros))


def time_ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 1 GiB device-to-device copy."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=20, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def split_variants(cfg: TileConfig, M: int, N: int, K: int, bits: int, sms: int) -> list[TileConfig]:
    tiles = triton.cdiv(M, cfg.block_m if cfg.kernel == "mma" else 1) * triton.cdiv(N, cfg.block_n)
    k_steps = triton.cdiv(K // (32 // bits), cfg.block_kw)
    splits = {1}
    for waves in (1, 2, 4, 8):
        s = 1
        while tiles * s < waves * sms and s * 2 * 4 <= k_steps:
            s *= 2
        splits.add(s)
    return [dataclasses.replace(cfg, split_k=s) for s in sorted(splits)]


def sweep(sms: int, copy_bw: float) -> list[str]:
    """Best tile config per (bits, shape, M) among a few candidates; returns summary lines."""
    lines = []
    for bits in (4, 8):
        kw = 128 // (32 // bits)  # words per 128 input channels
        gemv = [TileConfig("gemv", 1, bn, k, 1, w, st) for bn, k, w, st in
                [(128, kw, 4, 1), (256, kw, 4, 1), (64, kw, 4, 1), (128, 2 * kw, 4, 1), (256, kw // 2, 4, 1),
                 (128, kw, 4, 3)]]
        mma = [TileConfig("mma", 16, bn, k, 1, w, st) for bn, k, w, st in
               [(64, kw, 4, 3), (128, kw, 4, 3), (32, kw, 4, 3), (64, 2 * kw, 4, 3), (64, kw, 4, 5),
                (128, kw, 8, 3)]]
        for K, N in SHAPES[::2]:
            packed = random_layer(K, N, bits, False, 0)
            nbytes = weight_bytes(packed)
            for M in (1, 4, 16):
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                cands = (gemv if M <= 4 else []) + mma
                results = []
                for base in cands:
                    for cfg in split_variants(base, M, N, K, bits, sms):
                        ms = time_ms(lambda: dequant_gemm_triton(x, packed, bits, GROUP_SIZE, cfg))
                        results.append((ms, cfg))
                        print(f"SWEEP bits={bits} K={K} N={N} M={M} {fmt_cfg(cfg)} {ms * 1e3:.1f}us "
                              f"{nbytes / (ms * 1e-3) / copy_bw * 100:.0f}%", flush=True)
                results.sort(key=lambda r: r[0])
                default = choose_tile_config(M, N, K, bits, sms)
                d_ms = time_ms(lambda: dequant_gemm_triton(x, packed, bits, GROUP_SIZE, default))
                best = "; ".join(f"{fmt_cfg(c)} {ms * 1e3:.1f}us" for ms, c in results[:3])
                lines.append(f"bits={bits} {K}x{N} M={M}: default {fmt_cfg(default)} {d_ms * 1e3:.1f}us | best {best}")
            del packed
    return lines


def fmt_cfg(c: TileConfig) -> str:
    return f"{c.kernel}/m{c.block_m}n{c.block_n}kw{c.block_kw}s{c.split_k}w{c.num_warps}p{c.num_stages}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--large-m", action="store_true")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_bw = copy_bandwidth()
    if args.sweep:
        for line in sweep(sms, copy_bw):
            print("BEST", line)
        return

    ms_list = [1, 4, 16, 128] + ([512, 2048] if args.large_m else [])
    rows = []
    for act_order in (False, True):
        for bits in (4, 8) if not act_order else (4,):
            for K, N in SHAPES:
                packed = random_layer(K, N, bits, act_order, 1)
                group_size = None if act_order else GROUP_SIZE
                nbytes = weight_bytes(packed)
                W16 = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02
                for M in ms_list if not act_order else [1, 16, 128]:
                    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                    if act_order:  # the g_idx check syncs; it is not what is being timed
                        fn = lambda: dequant_gemm_triton(x, packed, bits, None, None)  # noqa: E731
                    else:
                        fn = lambda: dequant_gemm_triton(x, packed, bits, group_size)  # noqa: E731
                    ms = time_ms(fn)
                    torch_ms = time_ms(lambda: F.linear(x, W16))
                    cfg = choose_tile_config(M, N, K, bits, sms)
                    rows.append((bits, "act" if act_order else "seq", f"{K}x{N}", M, ms * 1e3,
                                 nbytes / (ms * 1e-3) / 1e9, nbytes / (ms * 1e-3) / copy_bw * 100, torch_ms * 1e3,
                                 torch_ms / ms, fmt_cfg(cfg), 2 * M * K * N / (ms * 1e-3) / 1e12))
                del packed, W16

    print(f"\ndevice: {device}, {sms} SMs; 1 GiB device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
    print("kernel time: median of triton.testing.do_bench (L2 flushed each run); torch = F.linear fp16 weight")
    head = ("bits", "g_idx", "KxN", "M", "kernel_us", "eff_GB/s", "%copy", "torch_us", "torch/ker", "TFLOP/s", "tiles")
    print(f"{head[0]:>4} {head[1]:>5} {head[2]:>11} {head[3]:>5} {head[4]:>10} {head[5]:>9} {head[6]:>6} "
          f"{head[7]:>9} {head[8]:>9} {head[9]:>8}  {head[10]}")
    for b, g, kn, M, us, gbs, pct, tus, ratio, cfg, tflops in rows:
        print(f"{b:>4} {g:>5} {kn:>11} {M:>5} {us:>10.1f} {gbs:>9.0f} {pct:>6.1f} {tus:>9.1f} {ratio:>9.2f} "
              f"{tflops:>8.1f}  {cfg}")


if __name__ == "__main__":
    main()
