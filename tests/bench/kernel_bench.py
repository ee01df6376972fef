"""Triton dequant-GEMM against the GPU's copy bandwidth and torch's fp16 matmul, on one CUDA GPU.

    python tests/bench/kernel_bench.py [--large-m] [--sweep] [--splits]

Measures a 1 GiB device-to-device copy (bytes read + written) in the same run, then for 4- and 8-bit
GPTQ layers (g128) with K×N in {8192×28672, 28672×8192, 8192×8192} and M in {1, 4, 16, 128}: the kernel's
median time per call in CUDA-graph replays that rotate over weight copies (L2 cold; launch overhead out),
the eager time (triton.testing.do_bench median, L2 flushed), the effective weight bandwidth
(qweight + scales + qzeros bytes / time) as GB/s and as % of the copy bandwidth, and
torch.nn.functional.linear on an fp16 weight of the same shape (CUDA graph). For M <= 16 an "(alt)" row
times the other small-M kernel with the same tiles. Act-order (g_idx permuted) rows follow.
--large-m adds M = 2048 for N = 8192. The table is printed last, then the kernel against the pure-torch
reference (the validate step's metric: per-token ||y_kernel - y_ref|| / ||y_ref|| with y_ref = x @ Wᵀ in
fp64 from the dequantized weight), max and mean over 64 tokens, for 4/8 bits, sequential and act-order
g_idx, fp16 and bf16 activations, both the Triton kernel and `dequant_gemm_reference` in x's dtype.
--sweep instead times alternative tile configs at M = 1, 4, 16 (for tuning `choose_tile_config`).
--accuracy prints only the kernel-vs-reference table.
--splits instead times every split_k in {1, 2, 4, 8, 16} on 4- and 8-bit 8192×28672 at M = 1, 4, 16, 64 with
the default tiles (both small-M kernels at M = 4, 16; split partials summed by `_sum_splits_kernel`), as µs per
call (CUDA graph, as above) and % of the copy bandwidth beside torch's fp16 matmul, the default marked; then a
BEST line per (bits, M): the default config against the fastest, to see whether `choose_tile_config` should
pick another split_k.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from rayquant.kernels.dequant_gemm import dequant_gemm_reference
from rayquant.kernels.triton_dequant_gemm import (GIdxLayout, TileConfig, choose_tile_config, dequant_gemm_triton,
                                                  read_g_idx_layout)
from rayquant.kernels.validation import validate_packed_layer
from rayquant.solver.pack import PackedLinear, dequantize_packed

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
        mma += [dataclasses.replace(c, kernel="mma_swapped") for c in mma[:2]]
        for K, N in SHAPES[::2]:
            packed = random_layer(K, N, bits, False, 0)
            nbytes = weight_bytes(packed)
            for M in (1, 4, 16):
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                cands = (gemv if M <= 4 else []) + mma
                results = []
                for base in cands:
                    for cfg in split_variants(base, M, N, K, bits, sms):
                        ms = time_ms(lambda c=cfg: dequant_gemm_triton(x, packed, bits, GIdxLayout(GROUP_SIZE), c))
                        results.append((ms, cfg))
                        print(f"SWEEP bits={bits} K={K} N={N} M={M} {fmt_cfg(cfg)} {ms * 1e3:.1f}us "
                              f"{nbytes / (ms * 1e-3) / copy_bw * 100:.0f}%", flush=True)
                results.sort(key=lambda r: r[0])
                default = choose_tile_config(M, N, K, bits, sms)
                d_ms = time_ms(lambda: dequant_gemm_triton(x, packed, bits, GIdxLayout(GROUP_SIZE), default))
                best = "; ".join(f"{fmt_cfg(c)} {ms * 1e3:.1f}us" for ms, c in results[:3])
                lines.append(f"bits={bits} {K}x{N} M={M}: default {fmt_cfg(default)} {d_ms * 1e3:.1f}us | best {best}")
    return lines


def splits_table(sms: int, copy_bw: float) -> None:
    """Every split_k of the default tiles on the MLP-up shape, per (bits, M); prints its own table."""
    K, N = SHAPES[0]
    rows, best_lines = [], []
    for bits in (4, 8):
        torch.cuda.empty_cache()
        first = random_layer(K, N, bits, False, 1)
        packs = [first] + [random_layer(K, N, bits, False, 2 + i) for i in range(copies_for(weight_bytes(first)) - 1)]
        W16 = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies_for(2 * K * N))]
        nbytes = weight_bytes(first)
        layout = GIdxLayout(GROUP_SIZE)
        for M in (1, 4, 16, 64):
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            default = choose_tile_config(M, N, K, bits, sms)
            bases = [default]
            if 1 < M <= 16:  # the other small-M tensor-core kernel, same tiles
                bases.append(dataclasses.replace(default, kernel="mma_swapped" if default.kernel == "mma" else "mma"))
            eager_ms = time_ms(lambda: dequant_gemm_triton(x, packs[0], bits, layout, default))
            reps = max(1, min(20, int(20.0 / eager_ms / len(packs))))
            torch_us = graph_us([lambda w=w: F.linear(x, w) for w in W16], max(1, reps // 2))
            timed = []  # (µs, config) of every run
            for base in bases:
                for split_k in sorted({1, 2, 4, 8, 16, default.split_k}):
                    cfg = dataclasses.replace(base, split_k=split_k)
                    calls = [lambda p=p, c=cfg: dequant_gemm_triton(x, p, bits, layout, c) for p in packs]
                    us = graph_us(calls, reps)
                    timed.append((us, cfg))
                    rows.append((bits, M, fmt_cfg(cfg) + (" (default)" if cfg == default else ""), us,
                                 nbytes / (us * 1e-6) / copy_bw * 100, torch_us))
                    print("SPLITS", *rows[-1], flush=True)
            d_us = next(t for t, c in timed if c == default)
            b_us, b_cfg = min(timed, key=lambda r: r[0])
            best_lines.append(f"bits={bits} M={M}: default {fmt_cfg(default)} {d_us:.1f}us "
                              f"({nbytes / (d_us * 1e-6) / copy_bw * 100:.1f}%) | fastest {fmt_cfg(b_cfg)} "
                              f"{b_us:.1f}us ({nbytes / (b_us * 1e-6) / copy_bw * 100:.1f}%)")

    print(f"\nsplit_k per M, {K}x{N} g128, fp16 activations; us: median per call of CUDA-graph replays rotating "
          "over weight copies (L2 cold), split partials summed by _sum_splits_kernel; %copy: (qweight + scales + "
          "qzeros bytes) / us against the copy bandwidth; torch_us: F.linear on an fp16 weight")
    print("{:>4} {:>4}  {:<44} {:>9} {:>7} {:>9}".format("bits", "M", "tiles", "us", "%copy", "torch_us"))
    for bits, M, cfg, us, pct, torch_us in rows:
        print(f"{bits:>4} {M:>4}  {cfg:<44} {us:>9.1f} {pct:>7.1f} {torch_us:>9.1f}")
    for line in best_lines:
        print("BEST", line)


def fmt_cfg(c: TileConfig) -> str:
    return f"{c.kernel}/m{c.block_m}n{c.block_n}kw{c.block_kw}s{c.split_k}w{c.num_warps}p{c.num_stages}"


def graph_us(calls: list, reps: int) -> float:
    """Median µs per call of a CUDA graph replaying `calls` (one per weight copy, so L2 holds none) reps times."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for call in calls:
                call()
    graph.replay()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * len(calls)))
    del graph
    return sorted(times)[len(times) // 2]


def copies_for(nbytes: int) -> int:
    """Weight copies to rotate through so that no run finds the previous one's weights in L2."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return min(8, max(2, -(-3 * l2 // nbytes)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--large-m", action="store_true")
    parser.add_argument("--splits", action="store_true")
    parser.add_argument("--accuracy", action="store_true", help="only the kernel-vs-reference table")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_bw = copy_bandwidth()
    if args.sweep:
        for line in sweep(sms, copy_bw):
            print("BEST", line)
        return
    if args.accuracy:
        print_accuracy()
        return
    if args.splits:
        print(f"device: {device}, {sms} SMs; 1 GiB device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
        splits_table(sms, copy_bw)
        return

    cases = []  # (bits, act_order, K, N, M, alternative tile config or None)
    for bits in (4, 8):
        for K, N in SHAPES:
            for M in [1, 4, 16, 128] + ([2048] if args.large_m and N == 8192 else []):
                cases.append((bits, False, K, N, M, None))
                if M <= 16:  # the other small-M tensor-core kernel, for comparison
                    cfg = choose_tile_config(M, N, K, bits, sms)
                    small_m = choose_tile_config(16, N, K, bits, sms)
                    alt = dataclasses.replace(small_m, kernel="mma_swapped" if cfg.kernel == "mma" else "mma")
                    cases.append((bits, False, K, N, M, alt))
    for K, N in SHAPES:
        for M in (1, 16, 128):
            cases.append((4, True, K, N, M, None))

    rows = []
    layers: dict = {}
    for bits, act_order, K, N, M, alt in cases:
        key = (bits, act_order, K, N)
        if key not in layers:
            layers.clear()
            torch.cuda.empty_cache()
            first = random_layer(K, N, bits, act_order, 1)
            layers[key] = [first] + [random_layer(K, N, bits, act_order, 2 + i)
                                     for i in range(copies_for(weight_bytes(first)) - 1)]
            W16 = [torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02 for _ in range(copies_for(2 * K * N))]
        packs = layers[key]
        nbytes = weight_bytes(packs[0])
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        layout = read_g_idx_layout(packs[0].g_idx)  # every copy has the same kind of g_idx
        assert (layout.group_size is None) == act_order
        cfg = alt or choose_tile_config(M, N, K, bits, sms)
        calls = [lambda p=p: dequant_gemm_triton(x, p, bits, layout, cfg) for p in packs]
        eager_ms = time_ms(calls[0])
        reps = max(1, min(20, int(20.0 / eager_ms / len(calls))))
        us = graph_us(calls, reps)
        torch_us = graph_us([lambda w=w: F.linear(x, w) for w in W16], max(1, reps // 2))
        rows.append((bits, "act" if act_order else "seq", f"{K}x{N}", M, us, eager_ms * 1e3,
                     nbytes / (us * 1e-6) / 1e9, nbytes / (us * 1e-6) / copy_bw * 100, torch_us, torch_us / us,
                     2 * M * K * N / (us * 1e-6) / 1e12, fmt_cfg(cfg) + (" (alt)" if alt else "")))
        print(*rows[-1], flush=True)

    print(f"\ndevice: {device}, {sms} SMs; 1 GiB device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
    print("kernel_us: median per call of CUDA-graph replays rotating over weight copies (L2 cold); eager_us: "
          "triton.testing.do_bench median, L2 flushed, launch overhead included when it exceeds the flush; "
          "torch_us: F.linear on an fp16 weight, CUDA graph; eff_GB/s = (qweight + scales + qzeros bytes) / "
          "kernel_us; (alt) = not the default tiles, for comparison")
    head = ("bits", "g_idx", "KxN", "M", "kernel_us", "eager_us", "eff_GB/s", "%copy", "torch_us", "torch/ker",
            "TFLOP/s", "tiles")
    print("{:>4} {:>5} {:>11} {:>5} {:>9} {:>9} {:>9} {:>6} {:>9} {:>9} {:>7}  {}".format(*head))
    for b, g, kn, M, us, eus, gbs, pct, tus, ratio, tflops, cfg in rows:
        print(f"{b:>4} {g:>5} {kn:>11} {M:>5} {us:>9.1f} {eus:>9.1f} {gbs:>9.0f} {pct:>6.1f} {tus:>9.1f} "
              f"{ratio:>9.2f} {tflops:>7.1f}  {cfg}")
    print_accuracy()


def print_accuracy() -> None:
    print("\nkernel vs reference, 8192x28672 g128, 64 tokens: max / mean relative error per token against fp64")
    print("{:>4} {:>5} {:>9} {:>22} {:>22}".format("bits", "g_idx", "x dtype", "triton max / mean", "reference max / mean"))
    for bits, act_order, dtype, triton_err, ref_err in accuracy_rows():
        print(f"{bits:>4} {'act' if act_order else 'seq':>5} {str(dtype).removeprefix('torch.'):>9} "
              f"{triton_err.max_rel_err:>10.2e} / {triton_err.mean_rel_err:.2e} "
              f"{ref_err.max_rel_err:>10.2e} / {ref_err.mean_rel_err:.2e}")


def accuracy_rows() -> list[tuple]:
    """The validate step's comparison for both kernels on one layer shape per (bits, g_idx, activation dtype)."""
    K, N = SHAPES[0]
    rows = []
    for bits in (4, 8):
        for act_order in (False, True):
            p = random_layer(K, N, bits, act_order, 7)
            W = dequantize_packed(p, bits)
            layout = read_g_idx_layout(p.g_idx)
            for dtype in (torch.float16, torch.bfloat16):
                x = torch.randn(64, K, device="cuda", generator=torch.Generator("cuda").manual_seed(3)).to(dtype)
                kernel = validate_packed_layer(x, p, bits, W, float("inf"),
                                               gemm=lambda a, q, b: dequant_gemm_triton(a, q, b, layout))
                reference = validate_packed_layer(x, p, bits, W, float("inf"), gemm=dequant_gemm_reference)
                rows.append((bits, act_order, dtype, kernel, reference))
    return rows


if __name__ == "__main__":
    main()
