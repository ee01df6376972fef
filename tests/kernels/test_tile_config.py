"""choose_tile_config's kernels and split_k for the MLP-up shape of a 70B model (K×N = 8192×28672) on an H100
(132 SMs): the splits measured fastest with `python tests/bench/kernel_bench.py --splits`."""

import pytest

pytest.importorskip("triton")

from rayquant.kernels.triton_dequant_gemm import choose_tile_config  # noqa: E402

H100_SMS = 132


@pytest.mark.parametrize("bits,M,kernel,split_k", [
    (4, 1, "gemv", 4), (8, 1, "gemv", 8),                # decode: unchanged, 8 programs per SM
    (4, 4, "mma_swapped", 4), (4, 16, "mma_swapped", 4),  # 4 programs per SM
    (8, 4, "mma", 2), (8, 16, "mma", 2),                  # 2 programs per SM
    (4, 64, "mma", 1), (8, 64, "mma", 1),                 # one wave of 224 tiles: no split
])
def test_split_choice_for_8192x28672_on_132_sms(bits: int, M: int, kernel: str, split_k: int) -> None:
    cfg = choose_tile_config(M, 28672, 8192, bits, H100_SMS)
    assert (cfg.kernel, cfg.split_k) == (kernel, split_k)


def test_split_k_keeps_four_k_steps_per_program() -> None:
    # K = 1024 at 4 bits: 8 K steps of 128 channels, so at most split 2 however few the tiles
    assert choose_tile_config(4, 128, 1024, 4, H100_SMS).split_k == 2
