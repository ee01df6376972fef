"""The Triton Hessian kernel (solver/hessian_triton.py): under Triton's CPU interpreter on small shapes against
the fp64 xᵀx (tiles on/above the diagonal, stale blocks below it, the full matrix once mirrored); compiled for an
H100 (sm_90) without a GPU; and on a GPU against the fp64 sum and the cuBLAS path (skipped without CUDA).

The interpreter must be switched on before triton is imported, so its runs happen in a subprocess:

    TRITON_INTERPRET=1 python -m tests.solver.test_hessian_triton OUT.pt
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# (dtype, in_features, tokens of each call): K off the tile grid (235: a ragged tile inside the last mirrored
# block, and off TMA's 8-column alignment), token counts off the step and chunk grids, several calls into one sum
CASES = ((torch.bfloat16, 235, (100, 37, 64)), (torch.float16, 192, (48,)), (torch.bfloat16, 128, (200,)))
# small tiles so a few hundred channels span many tiles and several mirrored blocks
TILE, STEP_TOKENS, CHUNK_TOKENS, GROUP_TILES, BLOCK = 32, 16, 32, 2, 64


def case_inputs(dtype: torch.dtype, K: int, calls: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(a symmetric fp32 starting sum [K, K], the calls' activations [T, K]), the same in runner and test."""
    gen = torch.Generator().manual_seed(K + len(calls))
    start = torch.randn(K, K, generator=gen)
    scale = torch.exp(0.5 * torch.randn(K, generator=gen))
    return start + start.T, [((torch.randn(T, K, generator=gen) + 0.5) * scale).to(dtype) for T in calls]


def _dot_widens_bfloat16(original):
    """Triton 3.6's interpreter multiplies bf16 dot operands as their uint16 storage (triton-lang/triton#11584):
    widen them to fp32 first, exactly, as the tensor cores do."""
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle, _convert_float

    def widen(h):
        if h.dtype != tl.bfloat16:
            return h
        return TensorHandle(_convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)

    def patched(self, a, b, d, *args):
        return original(self, widen(a), widen(b), d, *args)
    return patched


def main(out_path: str) -> None:
    import triton.runtime.interpreter as interpreter

    from rayquant.solver import hessian_triton
    from tests.kernels.interpreted_kernel_runs import _index_scalar_tensors

    if hasattr(interpreter, "_patch_lang_tensor"):  # Triton 3.6; see _index_scalar_tensors
        interpreter._patch_lang_tensor = _index_scalar_tensors(interpreter._patch_lang_tensor)
    interpreter.InterpreterBuilder.create_dot = _dot_widens_bfloat16(interpreter.InterpreterBuilder.create_dot)
    hessian_triton.TILE, hessian_triton.STEP_TOKENS = TILE, STEP_TOKENS
    hessian_triton.CHUNK_TOKENS, hessian_triton.GROUP_TILES = CHUNK_TOKENS, GROUP_TILES
    outputs = {}
    for dtype, K, calls in CASES:
        hessian_sum, xs = case_inputs(dtype, K, calls)
        for x in xs:
            hessian_triton.accumulate_upper_triton(hessian_sum, x, BLOCK)
        outputs[(dtype, K)] = hessian_sum
    torch.save(outputs, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    pytest.importorskip("triton")
    out_path = tmp_path_factory.mktemp("interpreted") / "hessians.pt"
    # a failing run's traceback reaches pytest's captured stderr
    subprocess.run([sys.executable, "-m", "tests.solver.test_hessian_triton", str(out_path)], check=True, cwd=REPO,
                   env=dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES=""), timeout=300)
    return torch.load(out_path)


def _block_of(K: int) -> torch.Tensor:
    """[K] the mirrored block each row/column lies in."""
    return torch.arange(K) // BLOCK


@pytest.mark.parametrize("dtype,K,calls", CASES, ids=[f"{d}-K{k}-T{'+'.join(map(str, c))}" for d, k, c in CASES])
def test_interpreted_kernel_adds_xtx_on_and_above_the_diagonal_blocks_only(
        interpreted: dict, dtype: torch.dtype, K: int, calls: tuple[int, ...]) -> None:
    start, xs = case_inputs(dtype, K, calls)
    x = torch.cat(xs).double()
    exact = start.double() + x.T @ x
    out = interpreted[(dtype, K)]
    block = _block_of(K)
    upper = block[None, :] >= block[:, None]  # blocks on and above the diagonal, diagonal blocks whole
    err = (out.double() - exact).abs() / exact.abs().max()
    assert float(err[upper].max()) <= 1e-6, float(err[upper].max())
    # blocks below the diagonal are left as they were, bit for bit, until mirror_upper
    assert torch.equal(out[~upper], start[~upper])
    # diagonal blocks are symmetric bit for bit: each tile above the diagonal wrote its transpose below it,
    # each diagonal tile mirrored its upper triangle
    same_block = block[None, :] == block[:, None]
    assert torch.equal(out[same_block], out.T[same_block])
    # mirrored as mirror_upper does on CUDA, it is the full symmetric sum
    mirrored = torch.where(upper, out, out.T)
    assert float(((mirrored.double() - exact).abs() / exact.abs().max()).max()) <= 1e-6


def test_tile_pairs_cover_each_tile_on_and_above_the_diagonal_once_in_row_groups() -> None:
    pytest.importorskip("triton")
    from rayquant.solver.hessian_triton import upper_tile_pairs
    tile_i, tile_j = upper_tile_pairs(13, 4, torch.device("cpu"))
    pairs = list(zip(tile_i.tolist(), tile_j.tolist()))
    assert sorted(pairs) == [(i, j) for i in range(13) for j in range(i, 13)]
    groups = [i // 4 for i, _ in pairs]
    assert groups == sorted(groups)  # one row group after another: its column strips stay in L2


# --- compiled for sm_90 without a GPU --------------------------------------------------------------

def _compile_sm90(even_k: bool) -> tuple[str, str, str]:
    """(TTGIR, PTX, ptxas -v's report) of the kernel with the module's tile constants for an H100."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rayquant.solver import hessian_triton as ht
    fn = ht._xtx_tiles_kernel
    constexprs = dict(TILE=ht.TILE, STEP_TOKENS=ht.STEP_TOKENS, CHUNK_TOKENS=ht.CHUNK_TOKENS, BLOCK_TILES=32,
                      EVEN_K=even_k)
    types = dict(x_desc=f"tensordesc<bf16[{ht.STEP_TOKENS}, {ht.TILE}]>", h_ptr="*fp32", tile_i_ptr="*i32",
                 tile_j_ptr="*i32")
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    # the launcher's specialisation for 16-byte aligned pointers and strides divisible by 16
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in ("h_ptr", "stride_h")}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=ht.NUM_WARPS, num_stages=ht.NUM_STAGES))
    ptx = compiled.asm["ptx"]
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton ships no ptxas here")
    ptx_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"xtx_tiles_{os.getpid()}_{even_k}.ptx"
    ptx_path.write_text(ptx)
    try:
        proc = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", str(ptx_path), "-o", os.devnull],
                              capture_output=True, text=True, timeout=120)
    finally:
        ptx_path.unlink()
    assert proc.returncode == 0, proc.stderr[-2000:]
    return compiled.asm["ttgir"], ptx, proc.stderr


@pytest.mark.parametrize("even_k", [True, False])
def test_compiled_kernel_streams_x_by_tma_into_async_wgmma_without_spills(even_k: bool) -> None:
    ttgir, ptx, report = _compile_sm90(even_k)
    # the chunk and step loops are flattened into one pipelined loop: loads run ahead across chunk ends
    assert ttgir.count("scf.for") == 1, ttgir.count("scf.for")
    assert "cp.async.bulk.tensor" in ptx  # x arrives by TMA: no address registers, zero padding past T and K
    assert "wgmma.mma_async" in ptx
    # the token loop keeps one wgmma in flight (a wait for all of them would serialise loads and MMAs)
    assert "wgmma.wait_group.sync.aligned 1" in ptx
    assert "C7515" not in report, report  # C7515: ptxas serialised the wgmma
    if even_k:  # K a multiple of TILE, as in real models: the two fp32 accumulators stay in registers
        assert "0 bytes spill stores" in report, report  # (ragged K's masked epilogue spills a little, once a tile)


# --- on a GPU --------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                reason="needs CUDA and triton")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b) / torch.linalg.vector_norm(b))


@needs_cuda
@pytest.mark.gpu
def test_gpu_kernel_within_2e_6_of_fp64_over_65536_correlated_tokens_and_near_cublas() -> None:
    from rayquant.solver import hessian
    from tests.bench import solver_bench
    K, T = 4096, 65536
    x = solver_bench.Activations(K, seed=7).chunk(T)  # correlated bf16 channels with outliers
    exact = torch.zeros(K, K, dtype=torch.float64, device=x.device)
    for t in range(0, T, 16384):
        xd = x[t:t + 16384].double()
        exact.addmm_(xd.T, xd)
    sums = {}
    default = hessian.HESSIAN_KERNEL
    try:
        for kernel in ("triton", "cublas"):
            hessian.HESSIAN_KERNEL = kernel
            sums[kernel] = torch.zeros(K, K, device=x.device)
            assert hessian.accumulate_hessian(sums[kernel], x) == T
    finally:
        hessian.HESSIAN_KERNEL = default
    triton_err = _relative(sums["triton"], exact)
    assert triton_err <= 2e-6, (triton_err, _relative(sums["cublas"], exact))
    assert _relative(sums["triton"], sums["cublas"].double()) <= 1e-5


@needs_cuda
@pytest.mark.gpu
def test_gpu_kernel_accumulates_deterministic_symmetric_sums_across_blocks_and_calls() -> None:
    """K = 5000: two mirrored blocks (4096 and 904 wide), tiles past K; three calls; mirror once at the end."""
    from rayquant.solver import hessian
    gen = torch.Generator(device="cuda").manual_seed(3)
    K = 5000
    scale = torch.exp(0.5 * torch.randn(K, generator=gen, device="cuda"))
    xs = [((torch.randn(T, K, generator=gen, device="cuda") + 1.0) * scale).bfloat16() for T in (3000, 777, 4096)]
    default = hessian.HESSIAN_KERNEL
    hessian.HESSIAN_KERNEL = "triton"
    try:
        runs = []
        for _ in range(2):
            hessian_sum = torch.zeros(K, K, device="cuda")
            for x in xs:
                hessian.accumulate_hessian(hessian_sum, x, mirror=False)
            hessian.mirror_upper(hessian_sum)
            runs.append(hessian_sum)
    finally:
        hessian.HESSIAN_KERNEL = default
    fp32 = torch.zeros(K, K, device="cuda")
    for x in xs:
        fp32.addmm_(x.float().T, x.float())
    assert torch.equal(runs[0], runs[1])  # fixed tiles, fixed summation order
    assert torch.equal(runs[0], runs[0].T)
    assert _relative(runs[0], fp32.double()) <= 1e-5


if __name__ == "__main__":
    main(sys.argv[1])
