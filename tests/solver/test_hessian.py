"""accumulate_hessian: Σxᵀx in fp32 plus the token count."""

import pytest
import torch

from rayquant.solver.hessian import InvalidSolverInput, accumulate_hessian


def test_accumulates_x_transpose_x_over_batches_and_counts_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 16, generator=gen)  # [batch, seq, K]
    b = torch.randn(7, 16, generator=gen)
    hessian_sum = torch.zeros(16, 16)
    assert accumulate_hessian(hessian_sum, a) == 10
    assert accumulate_hessian(hessian_sum, b) == 7
    x = torch.cat([a.reshape(-1, 16), b]).double()
    torch.testing.assert_close(hessian_sum.double(), x.T @ x, rtol=1e-5, atol=1e-5)


def test_bfloat16_activations_accumulate_in_float32() -> None:
    x = (torch.randn(64, 8, generator=torch.Generator().manual_seed(1)) * 3).bfloat16()
    hessian_sum = torch.zeros(8, 8)
    accumulate_hessian(hessian_sum, x)
    assert hessian_sum.dtype == torch.float32
    exact = x.double().T @ x.double()
    torch.testing.assert_close(hessian_sum.double(), exact, rtol=1e-6, atol=1e-4)


def test_activation_width_must_match() -> None:
    with pytest.raises(InvalidSolverInput, match="in_features=16"):
        accumulate_hessian(torch.zeros(16, 16), torch.randn(4, 12))
