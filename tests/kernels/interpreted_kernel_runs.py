"""Runs the Triton dequant-GEMM under Triton's CPU interpreter and saves the outputs, for
test_dequant_gemm_interpreted.py. A separate process, because TRITON_INTERPRET must be set before triton
itself is imported (triton.language's own helpers are jit functions too):

    TRITON_INTERPRET=1 python -m tests.kernels.interpreted_kernel_runs OUT.pt BITS

one process per bit width, run side by side (the interpreter keeps one core busy).
"""

import sys

import torch

from tests.kernels.test_dequant_gemm_gpu import random_packed_layer

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


def _index_scalar_tensors(original):
    """Triton 3.6's interpreter turns a scalar tensor into a loop bound with int() of a one-element 1-d array,
    which numpy >= 2.4 refuses (triton-lang/triton#9171): read the element instead."""
    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    return patched


def main(out_path: str, bits: int) -> None:
    import triton.runtime.interpreter as interpreter

    from rayquant.kernels import triton_dequant_gemm as kernels

    if hasattr(interpreter, "_patch_lang_tensor"):  # Triton 3.6; later versions read the element themselves
        interpreter._patch_lang_tensor = _index_scalar_tensors(interpreter._patch_lang_tensor)
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


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
