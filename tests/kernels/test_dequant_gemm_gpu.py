"""The Triton dequant-GEMM against the pure-torch reference on fresh random GPTQ layers (GPU only), and
`dequant_gemm`'s choice of implementation (CPU too)."""

import dataclasses

import pytest
import torch

from rayquant.kernels.dequant_gemm import dequant_gemm, dequant_gemm_reference
from rayquant.solver.grid import count_groups, dequantize, group_index, max_level
from rayquant.solver.pack import PackedLinear, pack_qweight, pack_qzeros

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs a CUDA GPU")

# ‖out − ref‖ / ‖ref‖ against the float64 product: the output's own rounding is ~3e-4 (fp16) and
# ~2e-3 (bf16); act-order also rounds the dequantized weights to x's dtype before the tensor cores
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_packed_layer(K: int, N: int, group_size: int, bits: int, act_order: bool, device: torch.device,
                        gen: torch.Generator) -> tuple[PackedLinear, torch.Tensor]:
    """A GPTQ v1 layer with random codes, zero points (>= 1), float16 scales and g_idx; and its W [N, K]."""
    G = count_groups(group_size, K)
    perm = torch.randperm(K, generator=gen) if act_order else torch.arange(K)
    g_idx = group_index(perm, group_size, static_groups=False)
    codes = torch.randint(0, max_level(bits) + 1, (N, K), generator=gen)
    zeros = torch.randint(1, max_level(bits) + 1, (G, N), generator=gen)
    scales = ((torch.rand(G, N, generator=gen) + 0.5) * 2.0 ** -bits / 16).to(torch.float16)
    packed = PackedLinear(qweight=pack_qweight(codes, bits), qzeros=pack_qzeros(zeros, bits), scales=scales,
                          g_idx=g_idx.to(torch.int32))
    W = dequantize(codes, scales, zeros, g_idx)
    return PackedLinear(*(t.to(device) for t in dataclasses.astuple(packed))), W.to(device)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(out.double() - ref) / torch.linalg.vector_norm(ref))


def _kernel_case(M: int, K: int, N: int, group_size: int, bits: int, act_order: bool, dtype: torch.dtype,
                 tile_config=None, seed: int = 0) -> tuple[float, float]:
    """Relative errors of the kernel and of the reference, both against the float64 product."""
    from rayquant.kernels.triton_dequant_gemm import dequant_gemm_triton

    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(seed)
    packed, W = random_packed_layer(K, N, group_size, bits, act_order, device, gen)
    x = torch.randn(M, K, generator=gen).to(device, dtype)
    exact = x.double() @ W.double().T
    torch.full((M + 64, N + 64), float("nan"), device=device, dtype=dtype)  # poison the next allocations
    out = dequant_gemm_triton(x, packed, bits, tile_config=tile_config)
    assert out.shape == (M, N) and out.dtype == dtype
    assert bool(torch.isfinite(out).all())
    return relative_error(out, exact), relative_error(dequant_gemm_reference(x, packed, bits), exact)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M,K,N,group_size", [
    (1, 4096, 4096, 128),   # decode: gemv, split-K
    (1, 2048, 512, 32),     # gemv with K steps shortened to the group
    (4, 2048, 1536, 128),   # small M: mma_swapped (4-bit) / mma (8-bit), split-K
    (16, 1024, 512, 64),
    (33, 640, 264, 128),    # K not a multiple of the group size (5 groups, last one partial); ragged tiles
    (300, 1024, 1000, -1),  # one group; large-M tiles
    (2048, 1024, 768, 32),  # validation-sized M; group narrower than a K step: gathered scales
])
def test_triton_kernel_matches_reference(M: int, K: int, N: int, group_size: int, bits: int, act_order: bool,
                                         dtype: torch.dtype) -> None:
    err, ref_err = _kernel_case(M, K, N, group_size, bits, act_order, dtype)
    print(f"\nKERNEL_ERR bits={bits} act_order={act_order} dtype={dtype} M={M} K={K} N={N} g={group_size} "
          f"kernel={err:.3e} reference={ref_err:.3e}")
    assert err <= TOLERANCE[dtype]
    assert err <= 3 * ref_err + 1e-4  # no worse than the reference's own rounding, by more than a little


@needs_cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kernel,block_m,split_k", [("gemv", 1, 1), ("gemv", 1, 3), ("mma", 16, 1), ("mma", 32, 4),
                                                    ("mma_swapped", 16, 1), ("mma_swapped", 32, 3)])
def test_every_tile_kernel_handles_every_m(bits: int, kernel: str, block_m: int, split_k: int) -> None:
    from rayquant.kernels.triton_dequant_gemm import TileConfig

    cfg = TileConfig(kernel, block_m, 64, 128 // (32 // bits), split_k, 4, 2)
    for M, act_order in [(1, False), (5, True), (40, False)]:
        err, _ = _kernel_case(M, 1536, 320, 128, bits, act_order, torch.bfloat16, tile_config=cfg, seed=M)
        assert err <= TOLERANCE[torch.bfloat16], (M, act_order, err)


@needs_cuda
def test_leading_dims_and_strided_activations() -> None:
    from rayquant.kernels.triton_dequant_gemm import dequant_gemm_triton

    gen = torch.Generator().manual_seed(3)
    packed, W = random_packed_layer(512, 256, 128, 4, True, torch.device("cuda"), gen)
    wide = torch.randn(6, 600, generator=gen).cuda().half()
    x = wide[:, :512]  # row stride 600
    out = dequant_gemm_triton(x.reshape(2, 3, 512), packed, 4)
    assert out.shape == (2, 3, 256)
    assert relative_error(out.reshape(6, 256), x.double() @ W.double().T) <= TOLERANCE[torch.float16]


@needs_cuda
def test_dequant_gemm_uses_the_kernel_on_cuda_and_is_deterministic() -> None:
    from rayquant.kernels.triton_dequant_gemm import dequant_gemm_triton

    gen = torch.Generator().manual_seed(4)
    packed, _ = random_packed_layer(4096, 512, 128, 4, False, torch.device("cuda"), gen)
    x = torch.randn(1, 4096, generator=gen).cuda().bfloat16()
    first = dequant_gemm(x, packed, 4)
    assert torch.equal(first, dequant_gemm_triton(x, packed, 4))
    assert all(torch.equal(first, dequant_gemm(x, packed, 4)) for _ in range(5))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequant_gemm_on_cpu_is_the_reference(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    packed, _ = random_packed_layer(256, 64, 64, bits, bits == 4, torch.device("cpu"), gen)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(7, 256, generator=gen).to(dtype)
        out = dequant_gemm(x, packed, bits)
        assert out.dtype == dtype
        assert torch.equal(out, dequant_gemm_reference(x, packed, bits))


@needs_cuda
@pytest.mark.slow  # 24 kernel compilations
@pytest.mark.parametrize("kernel,block_m,bits,act_order", [
    ("gemv", 1, 4, False), ("gemv", 1, 8, True), ("mma", 16, 8, False), ("mma", 32, 4, True),
    ("mma_swapped", 16, 4, False), ("mma_swapped", 16, 8, True)])
def test_split_k_output_is_bitwise_the_same_on_every_run_and_graph_replay(kernel: str, block_m: int, bits: int,
                                                                          act_order: bool) -> None:
    """`_sum_splits_kernel` adds the split partials in split order: repeated eager calls and CUDA-graph replays
    give the same bits, whatever order the split programs ran in."""
    from rayquant.kernels.triton_dequant_gemm import TileConfig, dequant_gemm_triton, read_g_idx_layout

    gen = torch.Generator().manual_seed(5)
    packed, W = random_packed_layer(4096, 1280, 128, bits, act_order, torch.device("cuda"), gen)
    layout = read_g_idx_layout(packed.g_idx)
    for M in (1, 40):
        x = torch.randn(M, 4096, generator=gen).cuda().half()
        for split_k in (3, 8):
            cfg = TileConfig(kernel, block_m, 64, 128 // (32 // bits), split_k, 4, 2)
            first = dequant_gemm_triton(x, packed, bits, layout, cfg)
            assert relative_error(first, x.double() @ W.double().T) <= TOLERANCE[torch.float16], (M, split_k)
            for _ in range(3):
                torch.full((M + 64, 1280 + 64), float("nan"), device="cuda", dtype=torch.half)  # poison
                assert torch.equal(dequant_gemm_triton(x, packed, bits, layout, cfg), first), (M, split_k)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = dequant_gemm_triton(x, packed, bits, layout, cfg)
            for _ in range(3):
                out.fill_(float("nan"))
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(out, first), (M, split_k)
