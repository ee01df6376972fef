"""The dequant-GEMM kernels compiled for an H100 (sm_90) without a GPU (Triton's compiler and the ptxas it ships):
every kernel builds with either split-K reduction, and the fused reduction's PTX keeps the ordering it relies on.
The CPU interpreter (test_dequant_gemm_interpreted.py) runs the same code but never shows the generated code."""

import re

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rayquant.kernels import triton_dequant_gemm as kernels  # noqa: E402

POINTER_TYPES = dict(x_ptr="*fp16", qweight_ptr="*i32", qzeros_ptr="*i32", scales_ptr="*fp16", g_idx_ptr="*i32",
                     out_ptr="*fp16", partial_ptr="*fp32", counter_ptr="*i32")
SPLIT_K = 8


def _ptx(kernel: str, fused_reduce: bool) -> str:
    """PTX of a 4-bit g128 fp16 kernel with SPLIT_K splits, every non-pointer argument an int32."""
    fn = {"gemv": kernels._dequant_gemv_kernel, "mma": kernels._dequant_mm_kernel,
          "mma_swapped": kernels._dequant_mm_swapped_kernel}[kernel]
    constexprs = dict(BITS=4, PACK=8, SEQUENTIAL=True, BLOCK_N=128, BLOCK_KW=16, SPLIT_K=SPLIT_K,
                      FUSED_REDUCE=fused_reduce)
    if kernel != "gemv":
        constexprs.update(LEVEL=0, BLOCK_M=16)
    signature = {name: "constexpr" if name in constexprs else POINTER_TYPES.get(name, "i32")
                 for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
    assert compiled.asm["cubin"]  # ptxas accepted it
    return compiled.asm["ptx"]


@pytest.mark.parametrize("kernel", ["gemv", "mma", "mma_swapped"])
def test_fused_reduction_orders_partial_stores_before_one_release_acquire_atomic(kernel: str) -> None:
    lines = _ptx(kernel, fused_reduce=True).splitlines()
    atomics = [i for i, line in enumerate(lines) if "atom." in line]
    assert len(atomics) == 1, [lines[i] for i in atomics]
    atom = atomics[0]
    # one thread (predicated) adds 1 with release + acquire at GPU scope
    assert re.search(r"@%p\d+ atom\.global\.gpu\.acq_rel\.add\.u32", lines[atom]), lines[atom]
    last_store = max(i for i in range(atom) if "st.global" in lines[i])
    # every thread's partial stores, then a CTA barrier, then thread 0's release: no store between
    assert any("bar.sync" in lines[i] for i in range(last_store, atom))
    # its result reaches every thread through shared memory and a barrier before the partials are read
    first_cg = min(i for i, line in enumerate(lines) if "ld.global.cg" in line)
    assert atom < first_cg and any("bar.sync" in lines[i] for i in range(atom, first_cg))
    # all SPLIT_K partials of the tile are read past L1 (one or more vector loads each)
    assert sum("ld.global.cg" in line for line in lines) >= SPLIT_K


@pytest.mark.parametrize("kernel", ["gemv", "mma", "mma_swapped"])
def test_two_kernel_reduction_has_no_atomic(kernel: str) -> None:
    ptx = _ptx(kernel, fused_reduce=False)
    assert "atom." not in ptx and "ld.global.cg" not in ptx
