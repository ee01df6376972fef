"""The dequant-GEMM kernels compiled for an H100 (sm_90) without a GPU (Triton's compiler and the ptxas it ships):
every kernel variant builds, writing the output (split_k 1) or fp32 split partials, and no variant nor the split
sum uses an atomic (the deterministic reduction). The CPU interpreter (test_dequant_gemm_interpreted.py) runs the
same code but never compiles it."""

import re

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rayquant.kernels import triton_dequant_gemm as kernels  # noqa: E402

KERNELS = {"gemv": kernels._dequant_gemv_kernel, "mma": kernels._dequant_mm_kernel,
           "mma_swapped": kernels._dequant_mm_swapped_kernel}
DTYPES = {"fp16": 0, "bf16": 1}  # activation dtype -> LEVEL of 4-bit codes (8-bit bf16 takes 2)
ATOMIC = re.compile(r"^\s*(@!?%p\d+\s+)?(atom|red)\.", re.MULTILINE)  # a PTX atomic, predicated or not


def _compile(fn, pointer_types: dict[str, str], constexprs: dict, num_stages: int):
    """Triton's sm_90 build of fn, every non-pointer, non-constexpr argument an int32."""
    signature = {name: "constexpr" if name in constexprs else pointer_types.get(name, "i32")
                 for name in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=num_stages))


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("bits,dtype,sequential", [(4, "fp16", True), (8, "bf16", True), (4, "bf16", False)])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_builds_for_sm90_without_atomics(kernel: str, bits: int, dtype: str, sequential: bool,
                                                split: bool) -> None:
    pack = 32 // bits
    constexprs = dict(BITS=bits, PACK=pack, SEQUENTIAL=sequential, BLOCK_N=128, BLOCK_KW=128 // pack)
    if kernel != "gemv":
        constexprs.update(LEVEL=DTYPES[dtype] if bits == 4 else 2, BLOCK_M=16)
    # split_k > 1 writes fp32 partials [split_k, M, N] through out_ptr; split_k == 1 the output itself
    pointers = dict(x_ptr=f"*{dtype}", qweight_ptr="*i32", qzeros_ptr="*i32", scales_ptr="*fp16", g_idx_ptr="*i32",
                    out_ptr="*fp32" if split else f"*{dtype}")
    compiled = _compile(KERNELS[kernel], pointers, constexprs, 1 if kernel == "gemv" else 3)
    assert compiled.asm["cubin"]  # ptxas accepted it
    ptx = compiled.asm["ptx"]
    assert "st.global" in ptx and not ATOMIC.search(ptx)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_split_sum_builds_for_sm90_without_atomics(dtype: str) -> None:
    compiled = _compile(kernels._sum_splits_kernel, dict(partial_ptr="*fp32", out_ptr=f"*{dtype}"),
                        dict(SPLIT_K=4, BLOCK=1024), 1)
    assert compiled.asm["cubin"]
    assert not ATOMIC.search(compiled.asm["ptx"])
