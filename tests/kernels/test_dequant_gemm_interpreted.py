"""The Triton dequant-GEMM kernels run by Triton's CPU interpreter (no GPU) on small layers, K=512, N=256, g128:
gemv, mma and mma_swapped at 4 and 8 bits, with and without act-order, split_k 1/2/4 (split partials summed by
`_sum_splits_kernel`), against the reference. test_dequant_gemm_gpu.py runs the same kernels compiled.

The interpreter must be switched on before triton is imported, so the kernels run in subprocesses, one per
bit width (tests/kernels/interpreted_kernel_runs.py):

    TRITON_INTERPRET=1 python -m tests.kernels.test_dequant_gemm_interpreted OUT.pt BITS
"""

import sys

import pytest
import torch

from rayquant.kernels.dequant_gemm import dequant_gemm_reference
from tests.kernels.interpreted_kernel_runs import patch_interpreter, run_interpreted
from tests.kernels.test_dequant_gemm_gpu import TOLERANCE, random_packed_layer, relative_error

K, N, GROUP_SIZE = 512, 256, 128
BITS = (4, 8)
ACT_ORDER = (False, True)
KERNEL_M = (("gemv", 1), ("mma_swapped", 4), ("mma", 16), ("mma_swapped", 16), ("mma", 5))  # 5: ragged M tile
SPLITS = (1, 2, 4)


def case_inputs(bits: int, act_order: bool, M: int) -> tuple:
    """(packed layer, W [N, K] float32, x [M, K] float16), the same in the runner and in the test."""
    gen = torch.Generator().manual_seed(100 * bits + 10 * act_order + M)
    packed, W = random_packed_layer(K, N, GROUP_SIZE, bits, act_order, torch.device("cpu"), gen)
    return packed, W, torch.randn(M, K, generator=gen).half()


def main(out_path: str, bits: int) -> None:
    from rayquant.kernels import triton_dequant_gemm as kernels

    patch_interpreter()
    outputs = {}
    for act_order in ACT_ORDER:
        for kernel, M in KERNEL_M:
            packed, _, x = case_inputs(bits, act_order, M)
            for split_k in SPLITS:
                cfg = kernels.TileConfig(kernel, 16, 64, 128 // (32 // bits), split_k, 4, 1)
                # a freed NaN block of the output's size: the call's torch.empty output likely gets it,
                # so an output the kernel never writes shows as NaN, not as the previous call's result
                del_me = torch.full((M, N), float("nan"), dtype=x.dtype)
                del del_me
                outputs[(bits, act_order, kernel, M, split_k)] = kernels.dequant_gemm_triton(
                    x, packed, bits, tile_config=cfg)
    torch.save(outputs, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """Every case's output, from one interpreter process per bit width, side by side."""
    pytest.importorskip("triton")
    return run_interpreted("tests.kernels.test_dequant_gemm_interpreted", [str(bits) for bits in BITS],
                           tmp_path_factory.mktemp("interpreted"), timeout_s=300)


@pytest.mark.parametrize("split_k", SPLITS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", ACT_ORDER)
@pytest.mark.parametrize("kernel,M", KERNEL_M)
def test_interpreted_kernel_matches_reference(interpreted: dict, bits: int, act_order: bool, kernel: str, M: int,
                                              split_k: int) -> None:
    packed, W, x = case_inputs(bits, act_order, M)
    exact = x.double() @ W.double().T
    ref_err = relative_error(dequant_gemm_reference(x, packed, bits), exact)
    out = interpreted[(bits, act_order, kernel, M, split_k)]
    assert out.shape == (M, N) and out.dtype == torch.float16
    err = relative_error(out, exact)  # NaN (a tile never written) fails too
    assert err <= TOLERANCE[torch.float16] and err <= 3 * ref_err + 1e-4, (err, ref_err)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
