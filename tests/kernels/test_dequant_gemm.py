"""dequant_gemm_reference: x @ Wᵀ with W dequantized from the GPTQ v1 tensors."""

import pytest
import torch

from rayquant.kernels.dequant_gemm import GemmShapeMismatch, dequant_gemm_reference
from rayquant.solver.gptq import GPTQConfig, dequantize, solve_gptq
from rayquant.solver.pack import PackedLinear, pack_linear


def _solved_layer(bits: int, desc_act: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 128, generator=gen) * torch.linspace(0.2, 3.0, 128)
    weight = torch.randn(64, 128, generator=gen) * 0.05
    return solve_gptq(weight, x.T @ x, 512, GPTQConfig(bits=bits, group_size=32, desc_act=desc_act, sym=False))


@pytest.mark.parametrize("bits,desc_act", [(2, False), (3, True), (4, True), (8, False)])
def test_reference_equals_x_times_dequantized_weight(bits: int, desc_act: bool) -> None:
    result = _solved_layer(bits, desc_act)
    x = torch.randn(17, 128, generator=torch.Generator().manual_seed(1))
    W = dequantize(result.codes, result.scales, result.zeros, result.g_idx)
    y = dequant_gemm_reference(x, pack_linear(result, bits), bits)
    assert y.shape == (17, 64) and y.dtype == torch.float32
    assert torch.equal(y, x @ W.T)


def test_identity_input_returns_the_hand_dequantized_weight() -> None:
    # K=8, N=8, one group: qweight words from tests/solver/test_pack.py's hand example (first 4
    # outputs), zero points 8 (stored 7), scales 0.5
    qweight = torch.tensor([[-2023406815, 15, -268435456, -1862345542, 0, 0, 0, 0]], dtype=torch.int32)
    packed = PackedLinear(qweight=qweight, qzeros=torch.tensor([[0x77777777]], dtype=torch.int32),
                          scales=torch.full((1, 8), 0.5, dtype=torch.float16), g_idx=torch.zeros(8, dtype=torch.int32))
    y = dequant_gemm_reference(torch.eye(8), packed, 4)  # [K, N] = Wᵀ
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [15, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 15],
                          [10, 11, 12, 13, 14, 15, 0, 9]] + [[0] * 8] * 4, dtype=torch.float32)
    assert torch.equal(y.T, (codes - 8) * 0.5)


def test_low_precision_activations_come_back_in_their_dtype() -> None:
    result = _solved_layer(4, True)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(2))
    y = dequant_gemm_reference(x.bfloat16(), pack_linear(result, 4), 4)
    assert y.dtype == torch.bfloat16
    W = dequantize(result.codes, result.scales, result.zeros, result.g_idx)
    torch.testing.assert_close(y.float(), x.bfloat16().float() @ W.T, rtol=1e-2, atol=1e-2)


def test_activation_width_must_match_in_features() -> None:
    packed = pack_linear(_solved_layer(4, False), 4)
    with pytest.raises(GemmShapeMismatch, match="in_features=128"):
        dequant_gemm_reference(torch.randn(3, 64), packed, 4)
